"""Ablation figures (figure 12 of issue 6): Δ accuracy bars and training curves per variant."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import schema
from analysis.figures._common import (
    Colors,
    MissingData,
    color_map,
    colors_for,
    finish,
    has_values,
    panels,
    plot_curves,
)
from analysis.io import val_columns


def ablation_deltas(summary: pd.DataFrame, colors: Colors | None = None) -> Figure:
    """Δ final validation accuracy of each variant vs the baseline, with seed error bars.

    ``summary`` is ``analysis.ablation_summary``; one panel per benchmark, one bar per
    non-baseline variant (variant colours), error bar = standard error of the difference
    of seed means (none where neither side has two seeds).
    """
    base = summary.attrs.get("baseline")
    if base is None:
        raise MissingData(f"no baseline variant {schema.BASELINE_VARIANT!r} with validation "
                          "accuracy in the ablation")
    benches = [c[: -len("/delta_final")] for c in summary.columns
               if c.endswith("/delta_final") and summary[c].notna().any()]
    others = [v for v in summary.index if v != base]
    if not benches or not others:
        raise MissingData("no variant besides the baseline has validation accuracy")
    colors = {**color_map(summary.index), **(colors or {})}
    fig, axes = panels(len(benches), size=(max(4.0, 0.9 * len(others) + 2), 3.8),
                       title=f"Δ final validation accuracy vs {base}")
    for ax, b in zip(axes, benches, strict=True):
        y = summary.loc[others, f"{b}/delta_final"].to_numpy(float)
        err = summary.loc[others, f"{b}/delta_final_err"].to_numpy(float)
        x = np.arange(len(others))
        ax.bar(x, np.nan_to_num(y), yerr=np.where(np.isnan(err), 0.0, err), capsize=4,
               color=[colors[v] for v in others])
        ax.set_xticks(x, others)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        finish(ax, xlabel="variant", ylabel=f"Δ accuracy vs {base}", title=b, legend=False)
    return fig


def ablation_curves(metrics: pd.DataFrame, colors: Colors | None = None, *,
                    max_val: int = 3) -> Figure:
    """Training curves per variant: validation accuracy (up to ``max_val`` metrics), mean
    entropy, response length and training accuracy; seed mean with a ±1 std band."""
    wanted = [c for c in val_columns(metrics.columns) if has_values(metrics, c)][:max_val]
    wanted += [c for c in (schema.ENTROPY_MEAN, schema.RESPONSE_LEN_MEAN, schema.REWARD_ACC)
               if has_values(metrics, c)]
    if not wanted:
        raise MissingData("no validation accuracy, entropy, length or accuracy curves logged")
    colors = colors_for(metrics, colors)
    fig, axes = panels(len(wanted), ncols=min(len(wanted), 3),
                       title="Training curves per variant (mean ± std over seeds)")
    for ax, col in zip(axes, wanted, strict=True):
        plot_curves(ax, metrics, col, colors)
        finish(ax, xlabel="step", ylabel=col.split("/", 1)[-1], title=col)
    return fig
