"""The summary of an ablation directory, printed (rich) and written as summary.csv and
summary.md: the numbers come from `analysis.summary` (mean and 95 % CI per variant, paired
difference to the baseline over the same seeds, p-value and n.s.)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis import schema

from ..errors import HapoError


def show_summary(ablation_dir: Path, console: Any = None):
    """Print the per-variant summary table of an ablation directory and write it as
    ``summary.csv`` and ``summary.md`` there. Returns the summary DataFrame."""
    from rich.console import Console

    from analysis.summary import ablation_summary, summary_display, write_summary

    console = console or Console()
    ablation_dir = Path(ablation_dir)
    if not (ablation_dir / schema.ABLATION).is_file():
        raise HapoError(
            f"{ablation_dir}: not an ablation directory (no {schema.ABLATION}); pass the "
            "--output of a `hapo ablate` run"
        )
    try:
        df = ablation_summary(ablation_dir)
    except ValueError as exc:
        raise HapoError(str(exc).splitlines()[0]) from None
    if df.empty:
        console.print(f"{ablation_dir}: no run has started yet; nothing to summarise")
        return df
    csv_path, md_path = write_summary(df, ablation_dir)
    shown = summary_display(df)
    base = df.attrs.get("baseline")
    title = f"ablation {df.attrs.get('ablation') or ablation_dir.name}"
    caption = (f"Δ vs baseline '{base}' (± standard error); cells mean ± std over seeds"
               if base else "no baseline variant: Δ not computed")
    for table in _summary_tables(shown, title, caption, console.width):
        console.print(table)
    console.print(f"written: {csv_path}, {md_path}", highlight=False)
    return df


def _summary_tables(shown, title: str, caption: str, width: int) -> list:
    """One rich table when it fits `width`; else one per benchmark metric (variant, seeds,
    final, best, Δ) and one for the rest (status, entropy, length), so nothing is cut."""
    from rich.table import Table

    def make(cols: list[str], name: str, cap: str | None, strip: str = ""):
        t = Table(title=name, caption=cap)
        for c in cols:
            t.add_column(str(c).removeprefix(strip),
                         justify="left" if c in ("variant", "status") else "right")
        for row in shown[cols].itertuples(index=False):
            t.add_row(*("" if v is None else str(v) for v in row))
        return t

    cols = list(shown.columns)
    need = sum(max(len(str(c)), *(len(str(v)) for v in shown[c])) + 3 for c in cols) + 1
    if need <= width:
        return [make(cols, title, caption)]
    metric_cols = [c for c in cols if c.endswith((" final", " best", " Δ final"))
                   and c not in ("entropy final", "response len final")]
    keys = list(dict.fromkeys(c.rsplit(" ", 2)[0] if c.endswith(" Δ final") else
                              c.rsplit(" ", 1)[0] for c in metric_cols))
    rest = [c for c in cols if c not in metric_cols]
    tables = [make(rest, title, None)]
    for i, key in enumerate(keys):
        group = ["variant", "seeds"] + [c for c in metric_cols if c.startswith(key + " ")]
        tables.append(make(group, key, caption if i == len(keys) - 1 else None, key + " "))
    return tables

