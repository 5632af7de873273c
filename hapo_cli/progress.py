"""The rich progress bar of training and warm-up, readable at 80 columns.

Fixed-width columns for the counts and the times (rich otherwise squeezes them to `400/…` and
`0:00:…` when the row is wider than the terminal); the free-text info column takes what is
left and is the one cut short with an ellipsis.
"""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column


def _fixed(width: int) -> Column:
    return Column(no_wrap=True, min_width=width)


def step_progress(label: str, total: int, disable: bool = False, console=None) -> Progress:
    """A bar `label ━━━━ 12/400 0:00:31 0:16:40 <info>`; tasks carry an `info` field."""
    count_width = 2 * len(str(max(total, 1))) + 1
    return Progress(
        TextColumn(f"[bold]{label}[/bold]", table_column=_fixed(len(label))),
        BarColumn(bar_width=16, table_column=_fixed(16)),
        MofNCompleteColumn(table_column=_fixed(count_width)),
        TimeElapsedColumn(table_column=_fixed(7)),
        TimeRemainingColumn(table_column=_fixed(7)),
        TextColumn("{task.fields[info]}",
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        disable=disable,
        console=console,
    )
