"""Ablation figures (figure 12 of the report, numbered as in ``analysis/report.py``): paired
Δ accuracy bars with 95 % CIs and significance markers, and training curves per variant."""

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
    reference_line,
)
from analysis.io import val_columns

SIG_MARKER = "*"


def ablation_deltas(summary: pd.DataFrame, colors: Colors | None = None) -> Figure:
    """Paired Δ final validation accuracy of each variant vs the baseline, 95 % CI error bars,
    "*" above the variants whose Δ is significant (paired t-test, p < 0.05).

    ``summary`` is ``analysis.ablation_summary``; one panel per benchmark, one bar per
    non-baseline variant (variant colours): height = mean over the paired seeds of
    ``v_s - b_s`` (``<bench>/final_pair_delta``), error bar = its 95 % confidence interval
    (``final_pair_ci_low``/``_high``; none with fewer than two pairs). Each x label carries
    the number of paired seeds ("n=k"); a seed missing on either side is not paired. A
    variant without a paired Δ in a benchmark has no bar and says "no pairs" where it
    would be (never a zero-height bar that reads as "no difference").
    """
    from analysis.summary import baseline_rows

    bases = baseline_rows(summary)
    if not bases:
        raise MissingData(f"no baseline variant {schema.BASELINE_VARIANT!r} with validation "
                          "accuracy in the ablation")
    # several (hapo ablate --baselines): each bar against its own baseline, named in its label
    base = next(iter(bases)) if len(bases) == 1 else "its baseline"
    vs = summary["vs"] if "vs" in summary.columns else None
    benches = [c[: -len("/final_pair_delta")] for c in summary.columns
               if c.endswith("/final_pair_delta") and summary[c].notna().any()]
    others = [v for v in summary.index if v not in bases]
    if not benches or not others:
        raise MissingData("no variant besides the baseline has validation accuracy paired "
                          "with the baseline's seeds")
    colors = {**color_map(summary.index), **(colors or {})}
    fig, axes = panels(len(benches), size=(max(4.0, 0.9 * len(others) + 2), 3.8),
                       title=f"Δ final validation accuracy vs {base} (paired by seed, 95% CI; "
                             f"{SIG_MARKER} p < 0.05)")
    for ax, b in zip(axes, benches, strict=True):
        d = summary.loc[others]
        y = d[f"{b}/final_pair_delta"].to_numpy(float)
        low = d[f"{b}/final_pair_ci_low"].to_numpy(float)
        high = d[f"{b}/final_pair_ci_high"].to_numpy(float)
        sig = d[f"{b}/final_pair_sig"].to_numpy(float)
        n = d[f"{b}/final_pair_n"].to_numpy(float)
        yerr = np.vstack([np.where(np.isnan(low), 0.0, y - low),
                          np.where(np.isnan(high), 0.0, high - y)])
        yerr = np.nan_to_num(yerr)
        x = np.arange(len(others))
        ok = ~np.isnan(y)
        ax.bar(x[ok], y[ok], yerr=yerr[:, ok], capsize=4,
               color=[colors[v] for v, k in zip(others, ok, strict=True) if k])
        for xi in x[~ok]:
            ax.text(xi, 0.0, "no pairs", ha="center", va="bottom", rotation=90, color="0.3")
        ends = np.where(y >= 0, np.where(np.isnan(high), y, high),
                        np.where(np.isnan(low), y, low))  # the far end of each bar + CI
        scale = np.nanmax(np.abs(ends)) if np.isfinite(ends).any() else 0.0
        pad = 0.04 * (scale if scale > 0 else 1.0)
        for xi, yi, end, s in zip(x, y, ends, sig, strict=True):
            if s >= 0.5:  # significant: the marker just beyond the error bar
                up = bool(yi >= 0)
                ax.text(float(xi), end + (pad if up else -pad), SIG_MARKER, ha="center",
                        va="bottom" if up else "top", fontsize="large")
        names = [f"{v}\nvs {vs[v]}" if vs is not None and vs[v] else v for v in others]
        ax.set_xticks(x, [f"{v}\nn={int(k)}" if not np.isnan(k) else v
                          for v, k in zip(names, n, strict=True)])
        reference_line(ax, 0.0)
        finish(ax, xlabel="variant (paired seeds)", ylabel=f"Δ accuracy vs {base}", title=b,
               legend=False, honest=False)  # a signed difference: its zero line is drawn
    return fig


def ablation_curves(metrics: pd.DataFrame, colors: Colors | None = None, *,
                    max_val: int = 3, smooth: float = 0.0) -> Figure:
    """Training curves per variant: validation accuracy (up to ``max_val`` metrics), mean
    entropy, response length and training accuracy; seed mean with a ±1 std band. The
    per-step curves take ``smooth``; validation accuracy is drawn raw."""
    wanted = [c for c in val_columns(metrics.columns) if has_values(metrics, c)][:max_val]
    wanted += [c for c in (schema.ENTROPY_MEAN, schema.RESPONSE_LEN_MEAN, schema.REWARD_ACC)
               if has_values(metrics, c)]
    if not wanted:
        raise MissingData("no validation accuracy, entropy, length or accuracy curves logged")
    colors = colors_for(metrics, colors)
    fig, axes = panels(len(wanted), ncols=min(len(wanted), 3),
                       title="Training curves per variant (mean ± std over seeds)")
    vals = set(val_columns(metrics.columns))
    for ax, col in zip(axes, wanted, strict=True):
        plot_curves(ax, metrics, col, colors, smooth=0.0 if col in vals else smooth)
        finish(ax, xlabel="step", ylabel=col.split("/", 1)[-1], title=col)
    return fig
