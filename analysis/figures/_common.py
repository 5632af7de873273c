"""Shared plotting helpers: colours, panels, seed-aggregated curves, token text display.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no
window): they render with the Agg canvas whatever backend the caller has selected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis import schema
from analysis.io import aggregate_seeds


class MissingData(Exception):  # noqa: N818 - reads as "raise MissingData(why)"
    """The data a figure needs is absent; the message says what is missing (one line)."""


Colors = dict[str, Any]


def color_map(labels: Iterable[str]) -> Colors:
    """One colour per label, assigned in order: tab10, then tab20's lighter shades.

    Build it once per report from all labels, and pass it to every figure so a run or
    variant keeps its colour across figures.
    """
    labels = list(dict.fromkeys(labels))
    base = list(colormaps["tab10"].colors)
    extra = list(colormaps["tab20"].colors)[1::2]
    palette = base + extra
    return {lab: palette[i % len(palette)] for i, lab in enumerate(labels)}


def colors_for(long: pd.DataFrame | None, colors: Colors | None,
               *more: pd.DataFrame | None) -> Colors:
    """``colors`` if given (extended for labels it lacks), else a map over the labels of
    ``long`` and ``more`` (tables with a ``label`` column; ``None`` or empty are ignored)."""
    labels: list[str] = []
    for df in (long, *more):
        if df is not None and "label" in df.columns:
            labels += list(dict.fromkeys(df["label"]))
    labels = list(dict.fromkeys(labels))
    if colors is None:
        return color_map(labels)
    missing = [lab for lab in labels if lab not in colors]
    if not missing:
        return colors
    extra = color_map([*colors, *missing])
    return {**colors, **{lab: extra[lab] for lab in missing}}


def panels(n: int, *, ncols: int | None = None, size: tuple[float, float] = (5.0, 3.6),
           title: str | None = None) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` axes in a grid (row-major), unused grid cells removed."""
    if n < 1:
        raise ValueError(f"a figure needs at least one panel, got n={n}")
    ncols = min(n, ncols or 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title)
    return fig, axes[:n]


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ``MissingData`` unless ``df`` has rows with a value in any of ``columns``."""
    columns = list(columns)
    present = [c for c in columns if c in df.columns and df[c].notna().any()]
    if not len(df) or not present:
        raise MissingData(f"no {what}: none of {', '.join(columns)} was logged")


def has_values(df: pd.DataFrame, column: str) -> bool:
    """True when ``column`` exists and has at least one value."""
    return column in df.columns and bool(pd.to_numeric(df[column], errors="coerce").notna().any())


def plot_curves(
    ax: Axes,
    long: pd.DataFrame,
    column: str,
    colors: Colors,
    *,
    linestyle: str = "-",
    suffix: str = "",
    band: bool = True,
) -> int:
    """Plot ``column`` vs step, one line per label: the seed mean, with a ±1 std band.

    The band is drawn only where two or more seeds have a value. Returns the number of
    lines drawn. Line labels are ``"<label><suffix>"``.
    """
    agg = aggregate_seeds(long, column)
    drawn = 0
    for label, d in agg.groupby("label", sort=False):
        x = d[schema.STEP].to_numpy(dtype=float)
        y = d["mean"].to_numpy(dtype=float)
        ax.plot(x, y, linestyle=linestyle, color=colors[label], label=f"{label}{suffix}")
        if band and (d["n"] > 1).any():
            s = d["std"].to_numpy(dtype=float)
            ax.fill_between(x, y - s, y + s, color=colors[label], alpha=0.2, linewidth=0)
        drawn += 1
    return drawn


def finish(ax: Axes, *, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """Labels, title, grid and (when there is anything labelled) a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend:
        handles, names = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize="small")


def display_token(text: Any) -> str:
    """Token text made visible and safe for matplotlib: spaces as '·', ``\\n`` escaped,
    ``$`` escaped (matplotlib would read ``$...$`` as mathtext)."""
    s = "" if text is None or (isinstance(text, float) and np.isnan(text)) else str(text)
    if s == "":
        return "''"
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return s.replace(" ", "·").replace("$", r"\$")


def subsample(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """At most ``n`` rows, drawn without replacement with a fixed seed (reproducible)."""
    return df if len(df) <= n else df.sample(n=n, random_state=seed)


def stairs_hist(ax: Axes, values: np.ndarray, edges: np.ndarray, *, color: Any,
                label: str) -> np.ndarray:
    """A density histogram drawn as a step outline; returns the densities."""
    dens, _ = np.histogram(values, bins=edges, density=True)
    ax.stairs(dens, edges, color=color, label=label, linewidth=1.5)
    return dens
