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
    ``summary.csv`` and ``summary.md`` there, unless another process runs the ablation (its
    lock is held): then only print, and say so; the ablation writes them when it ends. The
    line above the table states the step compared and flags unequal budgets. Returns the
    summary DataFrame."""
    from rich.console import Console
    from rich.markup import escape

    from analysis.summary import (
        REFERENCE_NOTE,
        REFERENCE_TITLE,
        SUMMARY_CSV,
        SUMMARY_MD,
        ablation_summary,
        reference_display,
        summary_baseline,
        summary_display,
        summary_note,
        write_summary,
    )

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
    live = _running_elsewhere(ablation_dir)
    if not live:
        csv_path, md_path = write_summary(df, ablation_dir)
    steps = df.attrs.get("steps_note", "")
    if df.attrs.get("unequal_steps"):
        console.print(f"[yellow]warning:[/yellow] {escape(steps)}", highlight=False,
                      soft_wrap=True)
    elif steps:
        console.print(steps, highlight=False, soft_wrap=True)
    shown = summary_display(df)
    title = f"ablation {df.attrs.get('ablation') or ablation_dir.name}"
    caption = summary_note(summary_baseline(df))
    for table in _summary_tables(shown, title, caption, console.width):
        console.print(table)
    refs = reference_display(df)
    if len(refs):
        for table in _summary_tables(refs, REFERENCE_TITLE, REFERENCE_NOTE, console.width):
            console.print(table)
    if live:
        console.print(f"{ablation_dir}: the ablation is still running (its lock is held): "
                      f"{SUMMARY_CSV} and {SUMMARY_MD} not written; they are when it ends",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"written: {csv_path}, {md_path}", highlight=False)
    return df


def _running_elsewhere(ablation_dir: Path) -> bool:
    """True when another process holds the ablation's lock (a live `hapo ablate` or its
    training processes). This process may hold it itself (the ablation's own summary at its
    end): flock conflicts between two descriptors of one process, so a lock file this process
    already has open counts as its own."""
    import fcntl
    import os

    from .plan import LOCK_FILE

    path = Path(ablation_dir) / LOCK_FILE
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return not _open_here(path, exclude=fd)
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return False


def _open_here(path: Path, exclude: int) -> bool:
    """True when this process has `path` open on a descriptor other than `exclude`."""
    import os

    target = os.stat(path)
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else range(4096)
    for raw in fds:
        fd = int(raw)
        if fd == exclude:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def _summary_tables(shown, title: str, caption: str, width: int) -> list:
    """One rich table when it fits `width`; else one per metric (variant, seeds or vs, and
    the metric's columns under short headers, the metric as the title), after a first one
    with the remaining columns (status) if any, so nothing is cut."""
    from rich.markup import escape
    from rich.table import Table

    def make(cols: list[str], name: str, cap: str | None, label: str = ""):
        t = Table(title=name, caption=cap)
        for c in cols:
            head = str(c)
            if label and head == label:
                head = "mean ± std"
            elif label and head.startswith(label.removesuffix("final")):
                head = head[len(label):].strip() or head[len(label.removesuffix("final")):]
            t.add_column(head, justify="left" if c in ("variant", "status") else "right")
        for row in shown[cols].itertuples(index=False):
            t.add_row(*("" if v is None else escape(str(v)) for v in row))
        return t

    cols = list(shown.columns)
    need = sum(max(len(str(c)), *(len(str(v)) for v in shown[c])) + 3 for c in cols) + 1
    groups: dict[str, list[str]] = shown.attrs.get("groups") or {}
    if need <= width or not groups:
        return [make(cols, title, caption)]
    ident = [c for c in ("variant", "seeds", "vs") if c in cols]
    grouped = {c for g in groups.values() for c in g}
    rest = [c for c in cols if c not in grouped]
    tables = [make(rest, title, None)] if set(rest) - set(ident) else []
    for i, (label, group) in enumerate(groups.items()):
        name = label if tables else f"{title}: {label}"
        tables.append(make([*ident, *group], name,
                           caption if i == len(groups) - 1 else None, label))
    return tables
