"""Shared plotting helpers: colours, panels, seed-aggregated curves, token text display.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no
window): they render with the Agg canvas whatever backend the caller has selected.

Three rules every figure follows, enforced here:

- No blank panel: ``finish`` writes in a panel without data why it has none (``empty=``).
- Honest y range: a panel whose y data (lines and bands) are all of one sign and span less
  than ``NARROW_SPAN`` of their largest magnitude gets an axis that includes zero, so a
  0.1 % wobble is drawn as the flat line it is (``honest_ylim``).
- Per-step curves are smoothed on request (``plot_curves(smooth=w)``, a debiased EMA), the
  raw values drawn faintly behind the smoothed line.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

from analysis import schema
from analysis.colors import REFERENCE, Colors, color_map
from analysis.io import aggregate_seeds

NARROW_SPAN = 0.10  # honest_ylim: y data spanning less than this of their magnitude
RAW_ALPHA = 0.25  # the raw values behind a smoothed curve
REFERENCE_GID = "reference"  # lines that are not data (zero, ratio = 1)
EMPTY_GID = "empty-reason"  # the text a panel without data shows


class MissingData(Exception):  # noqa: N818 - reads as "raise MissingData(why)"
    """The data a figure needs is absent; the message says what is missing (one line)."""


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
    if all(lab in colors for lab in labels):
        return colors
    return color_map(labels, taken=colors)


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


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average of ``y`` in order, NaN skipped (TensorBoard's).

    Naive form: ``s_i = w s_{i-1} + (1 - w) y_i`` from ``s_{-1} = 0``, reported as
    ``s_i / (1 - w^(k_i))`` with ``k_i`` the number of values seen so far, so the first
    point is ``y_0`` and not pulled toward zero. ``weight = 0`` returns ``y``.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    y = np.asarray(y, dtype=float)
    out = np.full_like(y, np.nan)
    s, k = 0.0, 0
    for i, v in enumerate(y):
        if np.isnan(v):
            continue
        s, k = weight * s + (1.0 - weight) * v, k + 1
        out[i] = s / (1.0 - weight**k)
    return out


def plot_curves(
    ax: Axes,
    long: pd.DataFrame,
    column: str,
    colors: Colors,
    *,
    linestyle: str = "-",
    suffix: str = "",
    band: bool = True,
    smooth: float = 0.0,
) -> int:
    """Plot ``column`` vs step, one line per label: the seed mean, with a ±1 std band.

    The band is drawn only where two or more seeds have a value. With ``smooth`` > 0 the
    line and band are EMAs (``ema``) of the mean and std, and the raw mean is drawn thin
    and faint behind (label ``"_<label><suffix> raw"``, out of the legend). Returns the
    number of lines drawn. Line labels are ``"<label><suffix>"``.
    """
    agg = aggregate_seeds(long, column)
    drawn = 0
    for label, d in agg.groupby("label", sort=False):
        x = d[schema.STEP].to_numpy(dtype=float)
        y = d["mean"].to_numpy(dtype=float)
        s = d["std"].to_numpy(dtype=float)
        if smooth > 0 and len(y) > 2:
            ax.plot(x, y, linestyle=linestyle, color=colors[label], alpha=RAW_ALPHA,
                    linewidth=0.8, label=f"_{label}{suffix} raw")
            y, s = ema(y, smooth), ema(s, smooth)
        ax.plot(x, y, linestyle=linestyle, color=colors[label], label=f"{label}{suffix}")
        if band and (d["n"] > 1).any():
            ax.fill_between(x, y - s, y + s, color=colors[label], alpha=0.2, linewidth=0)
        drawn += 1
    return drawn


def reference_line(ax: Axes, y: float) -> None:
    """A horizontal line that is not data (zero, ratio = 1): grey, thin, ignored by the
    no-blank-panel and honest-range checks."""
    ax.axhline(y, color=REFERENCE, linewidth=0.8, linestyle=":" if y else "-",
               gid=REFERENCE_GID)


def _data_lines(ax: Axes) -> list:
    return [ln for ln in ax.get_lines() if ln.get_gid() != REFERENCE_GID
            and np.isfinite(np.asarray(ln.get_ydata(), float)).any()]


def has_data(ax: Axes) -> bool:
    """True when the panel shows data: a line (not a reference line), a band, scatter
    points, bars or histogram steps."""
    if _data_lines(ax) or ax.patches or ax.images:
        return True
    for c in ax.collections:
        if isinstance(c, PathCollection):  # a scatter: its path is the marker, count points
            if len(np.asarray(c.get_offsets())):
                return True
        elif any(len(np.asarray(p.vertices)) for p in c.get_paths()):
            return True
    return False


def say_empty(ax: Axes, why: str) -> None:
    """Write in the middle of a panel why it has no data."""
    ax.set_xticks([])
    ax.set_yticks([])  # an empty panel's 0-1 ticks would be read as a scale
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True,
            color="0.3", gid=EMPTY_GID)


def honest_ylim(ax: Axes, narrow: float = NARROW_SPAN) -> bool:
    """Include zero in the y axis when its data span less than ``narrow`` of their magnitude.

    The data are the panel's lines (reference lines excepted) and bands. Applies only to
    data of one sign (all >= 0 or all <= 0): signed data already show their zero line.
    Returns True when the axis was widened.
    """
    ys = [np.asarray(ln.get_ydata(), float) for ln in _data_lines(ax)]
    ys += [np.asarray(p.vertices)[:, 1] for c in ax.collections if isinstance(c, PolyCollection)
           for p in c.get_paths()]
    y = np.concatenate(ys) if ys else np.array([])
    y = y[np.isfinite(y)]
    if not len(y) or (y.min() < 0 < y.max()):
        return False
    top = float(np.abs(y).max())
    if top == 0 or float(np.ptp(y)) >= narrow * top:
        return False
    lo, hi = (0.0, 1.05 * top) if y.max() > 0 else (-1.05 * top, 0.0)
    ax.set_ylim(lo, hi)
    return True


def finish(ax: Axes, *, xlabel: str, ylabel: str, title: str, legend: bool = True,
           empty: str | None = None, honest: bool = True) -> None:
    """Labels, title, grid and (when there is anything labelled) a small legend.

    A panel without data says why (``empty``, else a generic line); with ``honest`` its y
    range follows ``honest_ylim``.
    """
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if not has_data(ax):
        say_empty(ax, empty or "no data logged for this panel")
    elif honest:
        honest_ylim(ax)
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
