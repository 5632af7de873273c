"""Per-variant summary of an ablation (or per-label summary of any set of runs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from analysis import schema
from analysis.io import Run, last_valid, load_ablation, val_columns
from analysis.stats import PairedDiff, mean_ci, paired_difference
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


def _seed_steps(members: list[Run], finals: pd.DataFrame) -> dict[int, float]:
    """{seed: last logged step}; NaN for a seed whose runs ended at different steps."""
    by_seed: dict[int, set[float]] = {}
    for r, v in zip(members, finals["last_step"], strict=True):
        if r.seed is not None:
            by_seed.setdefault(int(r.seed), set()).add(float(v))
    return {s: next(iter(v)) if len(v) == 1 else math.nan for s, v in by_seed.items()}


def _same_step(values: dict[int, float], steps: dict[int, float],
               other: dict[int, float]) -> dict[int, float]:
    """``values`` of the seeds whose step equals the other side's step of that seed."""
    return {s: v for s, v in values.items()
            if s in other and not math.isnan(steps.get(s, math.nan))
            and steps.get(s) == other[s]}


def _seed_values(members: list[Run], finals: pd.DataFrame, col: str) -> dict[int, float]:
    """{seed: value of ``col``} (mean over runs sharing a seed); runs without a seed and
    NaN values are left out."""
    by_seed: dict[int, list[float]] = {}
    for r, v in zip(members, finals[col], strict=True):
        if r.seed is not None and not math.isnan(v):
            by_seed.setdefault(int(r.seed), []).append(float(v))
    return {s: math.fsum(vs) / len(vs) for s, vs in by_seed.items()}


def summarize_runs(
    runs: list[Run],
    *,
    key: Callable[[Run], str] = lambda r: r.label,
    baseline: str | Mapping[str, str] | None = schema.BASELINE_VARIANT,
    references: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per group of runs (``key``, e.g. the variant), seeds aggregated.

    Metrics: for each validation metric ``val/<bench>/<kind>`` (as ``<bench>/<kind>``) its
    ``/final`` (last logged) and ``/best`` value of each run, and ``entropy_final``,
    ``response_len_final``. For each metric ``m``:

    - ``m_mean``, ``m_std`` (sample std, n - 1), ``m_n`` (seeds with a value) and the 95 %
      confidence interval ``m_ci_low``, ``m_ci_high`` (Student t, n - 1 dof; NaN for n < 2);
    - vs the baseline, paired by seed over the seeds both have (``analysis.stats``):
      ``m_pair_n``, ``m_pair_delta`` (mean of v_s - b_s), ``m_pair_ci_low``,
      ``m_pair_ci_high``, ``m_pair_p`` (paired t-test, two-sided) and ``m_pair_sig``
      (1.0 significant at 5 %, 0.0 not, NaN with fewer than two pairs); NaN on the baseline
      row and without a baseline.
    - ``references`` (``{variant: other variant}``, e.g. ``ABCD-released -> ABCD``): the same
      paired statistics vs that variant, as ``m_ref_<stat>``, and its name in ``reference``
      (NaN / empty for variants without one). Columns only present when some reference is.

    Also, unpaired and kept for older readers, ``<bench>/<kind>/delta_final`` and
    ``/delta_best`` (variant mean minus baseline mean over all seeds) and
    ``/delta_final_err`` (``sqrt(std_v^2/n_v + std_b^2/n_b)`` over the terms with two or more
    seeds); and ``n_seeds``, ``seeds``, ``status``, ``last_step``. Groups keep first-seen
    order; the index is named ``variant``.

    ``baseline`` is one variant every other one is compared to, or a mapping ``{variant: its
    baseline}`` (``baseline_pairs``: under ``hapo ablate --baselines`` each ``<b>-<letters>``
    against ``<b>-none``). ``df.attrs["baselines"]`` is that mapping (the pairs present);
    ``df.attrs["baseline"]`` the single baseline, or None when there is none or several; with
    several, the column ``vs`` names each row's.
    """
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    rows: dict[str, dict[str, object]] = {}
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    seed_steps: dict[str, dict[int, float]] = {}
    for name, members in groups.items():
        finals = pd.DataFrame([_run_finals(r) for r in members])
        row: dict[str, object] = {
            "n_seeds": len(members),
            "seeds": ",".join(str(r.seed) for r in members if r.seed is not None),
            "status": ", ".join(f"{n} {s}" for s, n in
                                pd.Series([r.status for r in members]).value_counts().items()),
            "last_step": finals["last_step"].max() if "last_step" in finals else math.nan,
            "steps": ",".join(str(int(x)) for x in sorted(finals["last_step"].dropna().unique())),
        }
        seed_steps[name] = _seed_steps(members, finals)
        per_seed[name] = {}
        for col in finals.columns:
            if col == "last_step":
                continue
            ci = mean_ci(finals[col])
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = ci.mean, ci.std, ci.n
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = ci.low, ci.high
            per_seed[name][col] = _seed_values(members, finals, col)
        rows[name] = row
    if baseline is None or isinstance(baseline, str):
        wanted = {} if baseline is None else {v: baseline for v in rows}
    else:
        wanted = dict(baseline)
    base_of = {v: b for v, b in wanted.items() if v in rows and b in rows and v != b}
    for name, row in rows.items():
        base = base_of.get(name)
        for col in per_seed[name]:
            paired = None
            if base is not None:  # pairs at the same step only
                paired = paired_difference(
                    _same_step(per_seed[name][col], seed_steps[name], seed_steps[base]),
                    per_seed[base].get(col, {}))
            for stat in PAIR_STATS:
                row[f"{col}_pair_{stat}"] = _pair_value(paired, stat)
    refs = {v: r for v, r in (references or {}).items() if v in rows and r in rows and v != r}
    if refs:
        for name, row in rows.items():
            row["reference"] = refs.get(name, "")
            for col in per_seed[name]:
                paired = (paired_difference(
                    _same_step(per_seed[name][col], seed_steps[name], seed_steps[refs[name]]),
                    per_seed[refs[name]].get(col, {})) if name in refs else None)
                for stat in PAIR_STATS:
                    row[f"{col}_ref_{stat}"] = _pair_value(paired, stat)
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "variant"
    bases = set(base_of.values())
    if isinstance(baseline, str) and baseline in rows:
        bases.add(baseline)
    # each row's baseline for the unpaired deltas: its own; a baseline row compares to itself
    own = [base_of.get(v, v if v in bases else None) for v in df.index]
    # the unpaired deltas compare means: only between groups whose runs all ended at one step
    steps = df["steps"].to_dict()  # variant -> "100" or "90,100"
    same = pd.Series([b is not None and steps[v] == steps[b] and "," not in steps[v]
                      for v, b in zip(df.index, own, strict=True)],
                     index=df.index, dtype=bool)
    for b in benchmarks(df):
        for what in ("final", "best"):
            base = [cast(float, df.at[o, f"{b}/{what}_mean"]) if o is not None else math.nan
                    for o in own]
            df[f"{b}/delta_{what}"] = (df[f"{b}/{what}_mean"] - base).where(same)
        err = [_combine(_se(s, int(n)), _se(cast(float, df.at[o, f"{b}/final_std"]),
                                           int(cast(float, df.at[o, f"{b}/final_n"]))))
               if o is not None else math.nan
               for s, n, o in zip(df[f"{b}/final_std"], df[f"{b}/final_n"], own, strict=True)]
        df[f"{b}/delta_final_err"] = pd.Series(err, index=df.index, dtype=float).where(same)
    if len(bases) > 1:
        df.insert(0, "vs", [base_of.get(v, "") for v in df.index])
    df.attrs["baselines"] = base_of
    df.attrs["baseline"] = next(iter(bases)) if len(bases) == 1 else None
    df.attrs["steps_note"], df.attrs["unequal_steps"] = steps_note(df)
    return df


def steps_note(df: pd.DataFrame) -> tuple[str, bool]:
    """(one line stating the step the summary compares, whether the budgets differ). Every
    value of a run is its value at its last logged step; when runs ended at different steps
    the line names them, and Δ pairs only seeds at the same step."""
    steps = df["steps"].astype(str)
    distinct = {x for v in steps for x in v.split(",") if x}
    if not distinct:
        return "No step logged yet.", False
    if len(distinct) == 1:
        return f"Compared at step {distinct.pop()} (the last logged step of every run).", False
    by_steps: dict[str, list[str]] = {}
    for name, v in steps.items():
        by_steps.setdefault(v, []).append(str(name))
    parts = "; ".join(f"{', '.join(names)} at step{'s' if ',' in v else ''} {v}"
                      for v, names in sorted(by_steps.items(), key=lambda kv: kv[0]))
    if not baseline_rows(df) and "reference" not in df.columns:  # no Δ to qualify
        return f"Runs ended at different steps, each value is at its run's last: {parts}.", True
    return (f"Unequal budgets, not compared at one step: {parts}. Δ pairs only seeds at the "
            "same step (none: —); rerun the shorter runs with the same --max-steps."), True


PAIR_STATS = ("n", "delta", "ci_low", "ci_high", "p", "sig")


def _pair_value(paired: PairedDiff | None, stat: str) -> float:
    if paired is None:
        return math.nan
    if stat == "sig":
        sig = paired.significant
        return math.nan if sig is None else float(sig)
    return float({"n": paired.n, "delta": paired.delta, "ci_low": paired.low,
                  "ci_high": paired.high, "p": paired.p}[stat])


def _combine(a: float, b: float) -> float:
    terms = [x for x in (a, b) if not math.isnan(x)]
    return math.sqrt(sum(x * x for x in terms)) if terms else math.nan


def ablation_summary(ablation_dir: Path) -> pd.DataFrame:
    """Per-variant summary of an ablation directory (``ablation.json`` + run subfolders).

    Per variant: final and best validation accuracy per benchmark, final mean entropy and
    final response length (mean, std, 95 % CI over seeds), the paired difference to the
    baseline variant ``"none"`` and, for each ``<letters>-released`` variant, to
    ``<letters>`` (``released_references``); see ``summarize_runs`` for the columns. Variants in plan order; variants with
    no run directory yet are left out. Raises ``ValueError`` if the directory is not an
    ablation directory.
    """
    abl = load_ablation(Path(ablation_dir), tokens=False)
    df = summarize_ablation_runs(abl.runs)
    df.attrs["ablation"] = abl.name
    return df


def summarize_ablation_runs(runs: list[Run]) -> pd.DataFrame:
    """``summarize_runs`` of one ablation's runs grouped by variant: each variant paired with
    its baseline (``baseline_pairs``) and each '-released' one with its paper twin."""
    names = [r.variant or r.label for r in runs]
    none = schema.BASELINE_VARIANT
    return summarize_runs(runs, key=lambda r: r.variant or r.label,
                          baseline=none if none in names else baseline_pairs(names),
                          references=released_references(names))


def baseline_pairs(variants: Iterable[str]) -> dict[str, str]:
    """``{variant: the variant it is compared to}``. An ablation over one baseline: every
    variant against ``none``. Under ``hapo ablate --baselines`` (variants
    ``<baseline>-<letters>``, no ``none``): each against its own baseline's ``<baseline>-none``,
    so HAPO's letters on GRPO are paired with GRPO, on GSPO with GSPO (the paper's Table 1).
    The longest matching ``<baseline>-`` prefix wins ('dr-grpo-AB' is on dr-grpo, not on a
    baseline named 'dr'). Variants without a baseline of theirs are left out (no Δ)."""
    names = list(dict.fromkeys(variants))
    none = schema.BASELINE_VARIANT
    if none in names:
        return {v: none for v in names if v != none}
    suffix = "-" + none
    prefixes = sorted((b[: -len(suffix)] for b in names if b.endswith(suffix)), key=len,
                      reverse=True)
    out: dict[str, str] = {}
    for v in names:
        for p in prefixes:
            if v.startswith(p + "-") and v != p + suffix:
                out[v] = p + suffix
                break
    return out


def released_references(variants: Iterable[str]) -> dict[str, str]:
    """``{"ABCD-released": "ABCD", ...}`` for each '-released' variant whose paper twin is
    among ``variants``: the pairs compared in the "released vs paper" table."""
    names = list(dict.fromkeys(variants))
    return {v: p for v in names if (p := schema.paper_counterpart(v)) is not None and p in names}


def benchmarks(df: pd.DataFrame) -> list[str]:
    """The ``<bench>/<kind>`` keys of a summary, in column order."""
    return list(dict.fromkeys(c.rsplit("/", 1)[0] for c in df.columns
                              if c.endswith("/final_mean")))


def _nan(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pm(mean: float, std: float, fmt: str, signed: bool = False) -> str:
    if _nan(mean):
        return "—"
    s = format(mean, ("+" if signed else "") + fmt)
    return s if std is None or np.isnan(std) else f"{s} ± {format(std, fmt)}"


def _ci(n: float, low: float, high: float, fmt: str, signed: bool = False) -> str:
    """"[low, high]"; "n=1" where one value gives no interval; "—" where there is none."""
    if _nan(n) or int(n) == 0:
        return "—"
    if int(n) < 2 or _nan(low):
        return f"n={int(n)}"
    f = ("+" if signed else "") + fmt
    return f"[{format(low, f)}, {format(high, f)}]"


def _p(p: float) -> str:
    return "—" if _nan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def significance(n: float, sig: float) -> str:
    """The marker of a paired difference: "*" significant at 5 %, "n.s." not significant
    (the 95 % interval includes 0, p >= 0.05), "n=1" / "n=0" too few pairs to say."""
    if _nan(n):
        return ""
    if _nan(sig):
        return f"n={int(n)}"
    return "*" if sig >= 0.5 else "n.s."


def display_metrics(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(metric key, display label, number format) of the metrics a summary shows: the final
    value of each benchmark, then final entropy and response length."""
    out = [(f"{b}/final", f"{b} final", ".3f") for b in benchmarks(df)]
    for name, label, fmt in (("entropy_final", "entropy final", ".3f"),
                             ("response_len_final", "response len final", ".1f")):
        if f"{name}_mean" in df:
            out.append((name, label, fmt))
    return out


def summary_display(df: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for reading. Per metric ``<label>``: ``<label>`` "mean ± std",
    for benchmarks ``<bench> best``, ``<label> 95% CI`` "[low, high]" (or "n=1"); then the
    paired difference to the baseline: ``<label> Δ`` (mean over the paired seeds),
    ``<label> Δ 95% CI``, ``<label> p`` (paired t-test), ``<label> sig`` ("*" or "n.s.", or
    "n=1") and ``<label> pairs`` (seeds paired). ``attrs["groups"]`` maps each label to its
    columns (for splitting a wide table)."""
    table = pd.DataFrame(index=df.index)
    table["seeds"] = df["n_seeds"]
    table["status"] = df["status"]
    if df.attrs.get("unequal_steps"):
        table["step"] = df["steps"].str.replace(",", ", ")
    if "vs" in df.columns:  # several baselines: name each row's
        table.insert(0, "vs", df["vs"])
    bases = baseline_rows(df)
    is_base = df.index.isin(sorted(bases))
    groups: dict[str, list[str]] = {}
    for m, label, fmt in display_metrics(df):
        cols = [label]
        table[label] = [_pm(a, b, fmt) for a, b in zip(df[f"{m}_mean"], df[f"{m}_std"],
                                                        strict=True)]
        if m.endswith("/final"):
            best = m[: -len("final")] + "best"
            cols.append(label[: -len("final")] + "best")
            table[cols[-1]] = [_pm(a, b, fmt) for a, b in
                               zip(df[f"{best}_mean"], df[f"{best}_std"], strict=True)]
        cols.append(f"{label} 95% CI")
        table[cols[-1]] = [
            _ci(n, lo, hi, fmt) for n, lo, hi in
            zip(df[f"{m}_n"], df[f"{m}_ci_low"], df[f"{m}_ci_high"], strict=True)]
        if bases:
            for c, values in _pair_cells(df, m, label, fmt, "pair", is_base).items():
                table[c] = values
                cols.append(c)
        groups[label] = cols
    out = table.reset_index()
    out.attrs["groups"] = groups
    return out


def baselines_of(df: pd.DataFrame) -> dict[str, str]:
    """``{variant: its baseline}`` of a summary (``summarize_runs``), from either attribute."""
    pairs = df.attrs.get("baselines")
    if pairs is not None:
        return dict(pairs)
    base = df.attrs.get("baseline")
    return {} if base is None else {v: base for v in df.index if v != base}


def baseline_rows(df: pd.DataFrame) -> set[str]:
    """The variants of a summary that others are compared to."""
    base = df.attrs.get("baseline")
    return set(baselines_of(df).values()) | ({base} if base is not None else set())


def _pair_cells(df: pd.DataFrame, m: str, label: str, fmt: str, kind: str,
                skip: np.ndarray | None = None) -> dict[str, list[str]]:
    """The display columns of one paired comparison (``kind`` "pair": vs the baseline, "ref":
    vs the reference) of metric ``m``: Δ, Δ 95% CI, p, sig, pairs; rows in ``skip`` (the
    baseline itself) read "baseline" and blanks."""
    skip = np.zeros(len(df), dtype=bool) if skip is None else skip
    n, sig = df[f"{m}_{kind}_n"], df[f"{m}_{kind}_sig"]
    return {
        f"{label} Δ": ["baseline" if b else "—" if _nan(d) else format(d, "+" + fmt)
                       for d, b in zip(df[f"{m}_{kind}_delta"], skip, strict=True)],
        f"{label} Δ 95% CI": [
            "" if b else _ci(k, lo, hi, fmt, signed=True) for k, lo, hi, b in
            zip(n, df[f"{m}_{kind}_ci_low"], df[f"{m}_{kind}_ci_high"], skip, strict=True)],
        f"{label} p": ["" if b else _p(p)
                       for p, b in zip(df[f"{m}_{kind}_p"], skip, strict=True)],
        f"{label} sig": [significance(k, g) for k, g in zip(n, sig, strict=True)],
        f"{label} pairs": ["" if _nan(k) else str(int(k)) for k in n],
    }


def reference_display(df: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons with each variant's reference (``summarize_runs(references=
    ...)``; in an ablation: ``<letters>-released`` vs ``<letters>``) as strings: one row per
    variant that has one, columns ``variant``, ``vs`` and per metric as in
    ``summary_display`` (Δ, Δ 95% CI, p, sig, pairs). Empty when there is none."""
    if "reference" not in df.columns or not (df["reference"] != "").any():
        return pd.DataFrame()
    sub = df[df["reference"] != ""]
    table = pd.DataFrame({"vs": sub["reference"]}, index=sub.index)
    groups: dict[str, list[str]] = {}
    for m, label, fmt in display_metrics(df):
        cells = _pair_cells(sub, m, label, fmt, "ref")
        for c, values in cells.items():
            table[c] = values
        groups[label] = list(cells)
    out = table.reset_index()
    out.attrs["groups"] = groups
    return out


def summary_markdown(df: pd.DataFrame) -> str:
    """``summary_display`` as a markdown table."""
    return to_markdown(summary_display(df))


REFERENCE_TITLE = "Released vs paper entropy normalisation (paired by seed)"
REFERENCE_NOTE = ("Δ = `<letters>-released` - `<letters>` over the seeds both ran: the released "
                  "code's sign convention against the paper's, same letters, seeds and prompts.")


def write_summary(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` (all columns, full precision) and ``summary.md`` (readable).

    Returns ``(csv_path, md_path)``; creates ``out_dir`` if needed.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"write_summary needs a pandas DataFrame, got {type(df).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / SUMMARY_CSV, out / SUMMARY_MD
    df.to_csv(csv_path, index=True, index_label=str(df.index.name or "variant"))
    title = df.attrs.get("ablation")
    head = f"# Ablation summary: {title}\n\n" if title else "# Summary\n\n"
    steps = df.attrs.get("steps_note")
    if steps:
        head += ("**Warning: " + steps + "**" if df.attrs.get("unequal_steps") else steps) + "\n\n"
    note = summary_note(summary_baseline(df)) + "\n\n"
    text = head + note + summary_markdown(df)
    refs = reference_display(df)
    if len(refs):
        text += f"\n## {REFERENCE_TITLE}\n\n{REFERENCE_NOTE}\n\n" + to_markdown(refs)
    md_path.write_text(text, encoding="utf-8")
    return csv_path, md_path


def summary_baseline(df: pd.DataFrame) -> str | list[str] | None:
    """What ``summary_note`` says the Δ is against: the baseline, the baselines (sorted) when
    each variant has its own, or None."""
    bases = sorted(baseline_rows(df))
    return None if not bases else bases[0] if len(bases) == 1 else bases


def summary_note(baseline: str | list[str] | None) -> str:
    """What the cells of a summary table mean, in one paragraph; ``baseline`` a list when
    each variant is compared to its own baseline (``--baselines``, column vs)."""
    cells = ("Cells: mean ± std over seeds; 95% CI = Student t over seeds (n - 1 dof; "
             "n=1: one seed, no interval).")
    if not baseline:
        return cells + " No baseline variant: Δ not computed."
    if not isinstance(baseline, str):
        against = ("the row's baseline (column vs: " + ", ".join(f"`{b}`" for b in baseline)
                   + "; the same baseline without HAPO's letters)")
    else:
        against = f"the baseline `{baseline}`"
    return (cells + f" Δ = paired difference to {against} over the seeds "
            "both have (pairs; a seed missing on one side is left out), its 95% CI (t over "
            "the paired differences) and p (paired t-test); sig: * = significant at 5%, "
            "n.s. = not significant (the CI includes 0, p >= 0.05).")
