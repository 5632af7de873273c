"""Per-variant summary of an ablation (or per-label summary of any set of runs)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import schema
from analysis.io import Run, last_valid, load_ablation, val_columns
from analysis.tables import to_markdown

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def _run_finals(run: Run) -> dict[str, float]:
    """Final (last logged) and best value of each val metric, final entropy and length."""
    m = run.metrics
    out: dict[str, float] = {}
    for col in val_columns(m.columns):
        key = col[len(schema.VAL_PREFIX):]
        vals = pd.to_numeric(m[col], errors="coerce").dropna()
        out[f"{key}/final"] = float(vals.iloc[-1]) if len(vals) else math.nan
        out[f"{key}/best"] = float(vals.max()) if len(vals) else math.nan
    for name, col in (("entropy_final", schema.ENTROPY_MEAN),
                      ("response_len_final", schema.RESPONSE_LEN_MEAN)):
        out[name] = last_valid(m[col]) if col in m.columns else math.nan
    out["last_step"] = float(m[schema.STEP].max()) if len(m) else math.nan
    return out


def _se(std: float, n: int) -> float:
    return std / math.sqrt(n) if n > 1 and not math.isnan(std) else math.nan


def summarize_runs(
    runs: list[Run],
    *,
    key: Callable[[Run], str] = lambda r: r.label,
    baseline: str | None = schema.BASELINE_VARIANT,
) -> pd.DataFrame:
    """One row per group of runs (``key``, e.g. the variant), seeds aggregated.

    Columns, for each validation metric ``val/<bench>/<kind>`` (as ``<bench>/<kind>``):
    ``/final_mean``, ``/final_std``, ``/best_mean``, ``/best_std`` (mean and sample std over
    seeds of the last logged and the best value), ``/delta_final`` and ``/delta_best``
    (mean minus the baseline's mean) and ``/delta_final_err``, the standard error of that
    difference, ``sqrt(std_v^2/n_v + std_b^2/n_b)`` over the terms with two or more seeds
    (NaN when neither has two). Also ``entropy_final_mean/std``,
    ``response_len_final_mean/std``, ``n_seeds``, ``seeds``, ``status`` and ``last_step``.
    Groups keep first-seen order; the index is named ``variant``.
    """
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    rows = {}
    for name, members in groups.items():
        finals = pd.DataFrame([_run_finals(r) for r in members])
        row: dict[str, object] = {
            "n_seeds": len(members),
            "seeds": ",".join(str(r.seed) for r in members if r.seed is not None),
            "status": ", ".join(f"{n} {s}" for s, n in
                                pd.Series([r.status for r in members]).value_counts().items()),
            "last_step": finals["last_step"].max() if "last_step" in finals else math.nan,
        }
        for col in finals.columns:
            if col == "last_step":
                continue
            vals = finals[col].dropna()
            row[f"{col}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{col}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{col}_n"] = len(vals)
        rows[name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "variant"
    benches = list(dict.fromkeys(c.rsplit("/", 1)[0] for c in df.columns
                                 if c.endswith("/final_mean")))
    have_base = baseline is not None and baseline in df.index
    for b in benches:
        for what in ("final", "best"):
            base = df.at[baseline, f"{b}/{what}_mean"] if have_base else math.nan
            df[f"{b}/delta_{what}"] = df[f"{b}/{what}_mean"] - base
        if have_base:
            se_b = _se(df.at[baseline, f"{b}/final_std"], int(df.at[baseline, f"{b}/final_n"]))
            err = [_combine(_se(s, int(n)), se_b)
                   for s, n in zip(df[f"{b}/final_std"], df[f"{b}/final_n"], strict=True)]
            df[f"{b}/delta_final_err"] = err
        else:
            df[f"{b}/delta_final_err"] = math.nan
    df = df.drop(columns=[c for c in df.columns if c.endswith("_n") and c != "n_seeds"])
    df.attrs["baseline"] = baseline if have_base else None
    return df


def _combine(a: float, b: float) -> float:
    terms = [x for x in (a, b) if not math.isnan(x)]
    return math.sqrt(sum(x * x for x in terms)) if terms else math.nan


def ablation_summary(ablation_dir: Path) -> pd.DataFrame:
    """Per-variant summary of an ablation directory (``ablation.json`` + run subfolders).

    Per variant: final and best validation accuracy per benchmark (mean and std over
    seeds), delta vs the baseline variant ``"none"``, final mean entropy and final response
    length; see ``summarize_runs`` for the columns. Variants in plan order; variants with
    no run directory yet are left out. Raises ``ValueError`` if the directory is not an
    ablation directory.
    """
    abl = load_ablation(Path(ablation_dir), tokens=False)
    df = summarize_runs(abl.runs, key=lambda r: r.variant or r.label)
    df.attrs["ablation"] = abl.name
    return df


def benchmarks(df: pd.DataFrame) -> list[str]:
    """The ``<bench>/<kind>`` keys of a summary, in column order."""
    return list(dict.fromkeys(c.rsplit("/", 1)[0] for c in df.columns
                              if c.endswith("/final_mean")))


def _pm(mean: float, std: float, fmt: str, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    s = format(mean, ("+" if signed else "") + fmt)
    return s if std is None or np.isnan(std) else f"{s} ± {format(std, fmt)}"


def summary_display(df: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for reading: "mean ± std" cells, signed deltas."""
    table = pd.DataFrame(index=df.index)
    table["seeds"] = df["n_seeds"]
    table["status"] = df["status"]
    for b in benchmarks(df):
        table[f"{b} final"] = [_pm(m, s, ".3f") for m, s in
                               zip(df[f"{b}/final_mean"], df[f"{b}/final_std"], strict=True)]
        table[f"{b} best"] = [_pm(m, s, ".3f") for m, s in
                              zip(df[f"{b}/best_mean"], df[f"{b}/best_std"], strict=True)]
        table[f"{b} Δ final"] = [_pm(m, s, ".3f", signed=True) for m, s in
                                 zip(df[f"{b}/delta_final"], df[f"{b}/delta_final_err"],
                                     strict=True)]
    for name, fmt in (("entropy_final", ".3f"), ("response_len_final", ".1f")):
        if f"{name}_mean" in df:
            table[name.replace("_", " ")] = [
                _pm(m, s, fmt) for m, s in zip(df[f"{name}_mean"], df[f"{name}_std"],
                                               strict=True)]
    return table.reset_index()


def summary_markdown(df: pd.DataFrame) -> str:
    """``summary_display`` as a markdown table."""
    return to_markdown(summary_display(df))


def write_summary(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` (all columns, full precision) and ``summary.md`` (readable).

    Returns ``(csv_path, md_path)``; creates ``out_dir`` if needed.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"write_summary needs a pandas DataFrame, got {type(df).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / SUMMARY_CSV, out / SUMMARY_MD
    df.to_csv(csv_path, index=True, index_label=df.index.name or "variant")
    title = df.attrs.get("ablation")
    base = df.attrs.get("baseline")
    head = f"# Ablation summary: {title}\n\n" if title else "# Summary\n\n"
    note = (f"Δ is the difference of seed means vs the baseline variant `{base}`, ± the "
            "standard error of that difference; other cells are mean ± std over seeds.\n\n"
            if base else "No baseline variant: Δ not computed. Cells are mean ± std over "
            "seeds.\n\n")
    md_path.write_text(head + note + summary_markdown(df), encoding="utf-8")
    return csv_path, md_path
