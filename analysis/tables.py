"""Tables computed from token samples and eval rows, and markdown rendering of tables."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis import schema


def dual_entropy_table(tokens: pd.DataFrame, *, frac: float = 0.2, top: int = 20) -> pd.DataFrame:
    """Token strings that occur both among the highest- and the lowest-entropy tokens.

    Per run, "high" is entropy >= its (1 - frac) quantile and "low" is entropy <= its frac
    quantile (frac=0.2: above the 80th and below the 20th percentile, the paper's pivot).
    Counts are summed over runs. Returns columns ``token, high_count, low_count, total``
    sorted by ``min(high, low)`` then total, at most ``top`` rows.
    """
    if not 0.0 < frac < 0.5:
        raise ValueError(f"frac must be in (0, 0.5), got {frac!r}")
    cols = ["token", "high_count", "low_count", "total"]
    need = {"token_text", "entropy"}
    if not len(tokens) or not need <= set(tokens.columns):
        return pd.DataFrame(columns=cols)
    d = tokens[["token_text", "entropy"] + (["run"] if "run" in tokens else [])].copy()
    d["entropy"] = pd.to_numeric(d["entropy"], errors="coerce")
    d = d.dropna(subset=["entropy", "token_text"])
    if "run" not in d:
        d["run"] = ""
    hi_parts, lo_parts = [], []
    for _, g in d.groupby("run", sort=False):
        hi_parts.append(g.loc[g["entropy"] >= g["entropy"].quantile(1 - frac), "token_text"])
        lo_parts.append(g.loc[g["entropy"] <= g["entropy"].quantile(frac), "token_text"])
    if not hi_parts:
        return pd.DataFrame(columns=cols)
    hi = pd.concat(hi_parts).astype(str).value_counts()
    lo = pd.concat(lo_parts).astype(str).value_counts()
    both = hi.index.intersection(lo.index)
    out = pd.DataFrame({
        "token": both,
        "high_count": hi.reindex(both).to_numpy(dtype=int),
        "low_count": lo.reindex(both).to_numpy(dtype=int),
    })
    out["total"] = out["high_count"] + out["low_count"]
    out["_min"] = out[["high_count", "low_count"]].min(axis=1)
    out = out.sort_values(["_min", "total", "token"], ascending=[False, False, True],
                          kind="stable")
    out = out.drop(columns="_min").head(top).reset_index(drop=True)
    out.attrs["frac"] = frac
    return out


def accuracy_column(evals: pd.DataFrame) -> str | None:
    """The eval accuracy column: ``avg@<k>`` (largest k), else ``avg@k``, else ``pass@1``."""
    avg = [c for c in evals.columns if isinstance(c, str) and schema.EVAL_AVG_RE.match(c)]
    numbered = sorted((c for c in avg if c != "avg@k"), key=lambda c: int(c.split("@")[1]))
    if numbered:
        return numbered[-1]
    if "avg@k" in avg:
        return "avg@k"
    return "pass@1" if "pass@1" in evals.columns else None


def latest_checkpoint(evals: pd.DataFrame) -> pd.DataFrame:
    """Keep, per run, only the rows of its latest evaluated checkpoint."""
    if schema.EVAL_CHECKPOINT_STEP not in evals.columns or "run" not in evals.columns:
        return evals
    step = pd.to_numeric(evals[schema.EVAL_CHECKPOINT_STEP], errors="coerce").fillna(-1)
    last = step.groupby(evals["run"]).transform("max")
    return evals[step == last]


def eval_table(evals: pd.DataFrame) -> pd.DataFrame:
    """Eval rows of the latest checkpoint, averaged over seeds per label, benchmark, setting."""
    acc = accuracy_column(evals)
    if not len(evals) or acc is None or schema.EVAL_BENCHMARK not in evals.columns:
        return pd.DataFrame()
    d = latest_checkpoint(evals).copy()
    if schema.EVAL_SETTING not in d.columns:
        d[schema.EVAL_SETTING] = ""
    keys = ["label", schema.EVAL_BENCHMARK, schema.EVAL_SETTING]
    value_cols = [c for c in [acc, "pass@1", "maj@k", schema.EVAL_RESPONSE_LEN,
                              schema.EVAL_TRUNCATION, schema.EVAL_CRITICAL_TOKENS]
                  if c in d.columns]
    value_cols = list(dict.fromkeys(value_cols))
    for c in value_cols:
        d[c] = pd.to_numeric(d[c], errors="coerce")
    out = d.groupby(keys, sort=False)[value_cols].mean()
    out.insert(0, "seeds", d.groupby(keys, sort=False)["run"].nunique())
    return out.reset_index()


def _numbers(df: pd.DataFrame, col: str) -> pd.Series:
    """The numeric, present values of a column (empty when the column is absent)."""
    if col not in df:
        return pd.Series(dtype=float)
    return pd.to_numeric(df[col], errors="coerce").dropna()


def reward_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run and reward of ``data.rewards`` (``reward/<name>/<kind>`` columns of the
    long metrics table): ``mean`` over the steps that logged it, its ``last`` value, the
    ``errors`` summed over steps (failed calls), and the other keys the function returned
    (mean over steps, as ``<key>``). Empty when no run logged a per-reward key."""
    parsed = {c: schema.parse_reward_metric(c) for c in metrics.columns if isinstance(c, str)}
    parsed = {c: p for c, p in parsed.items() if p is not None}
    names = list(dict.fromkeys(name for name, _ in parsed.values()))
    kinds = list(dict.fromkeys(k for _, k in parsed.values()
                               if k not in (schema.REWARD_PART_MEAN, schema.REWARD_PART_ERRORS)))
    rows = []
    for run, g in metrics.groupby("run", sort=False) if "run" in metrics else []:
        for name in names:
            mean, errors = (_numbers(g, schema.reward_metric(name, k))
                            for k in (schema.REWARD_PART_MEAN, schema.REWARD_PART_ERRORS))
            if not len(mean) and not len(errors):
                continue
            row = {"run": run, "reward": name,
                   "mean": float(mean.mean()) if len(mean) else math.nan,
                   "last": float(mean.iloc[-1]) if len(mean) else math.nan,
                   "errors": float(errors.sum()) if len(errors) else math.nan}
            for k in kinds:
                v = _numbers(g, schema.reward_metric(name, k))
                row[k] = float(v.mean()) if len(v) else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=["run", "reward", "mean", "last", "errors", *kinds])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def md_escape(s: str) -> str:
    """Make a cell safe in a markdown table: pipes, backticks, newlines escaped."""
    return (s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("$", "\\$")
            .replace("\n", "\\n").replace("\r", "\\r"))


def to_markdown(df: pd.DataFrame, *, index: bool = False) -> str:
    """A pipe table (no ``tabulate`` dependency); floats to 4 significant digits."""
    if index:
        df = df.reset_index()
    if not len(df.columns):
        return "_(empty)_\n"
    header = "| " + " | ".join(md_escape(str(c)) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(md_escape(_fmt(v)) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([header, sep, *rows]) + "\n"


def to_html_table(df: pd.DataFrame) -> str:
    """An HTML table with the same formatting as ``to_markdown``."""
    import html

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
