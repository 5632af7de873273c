"""Training curves from ``metrics.jsonl`` (figures 1-4 and 7 of the report, numbered as in
``analysis/report.py``).

Every function takes the long metrics table of ``analysis.io.stack_metrics`` (columns
``run, label, seed, step`` and the metric names of ``analysis.schema``) and draws one line
per label: the mean over its seeds, with a ±1 std band where there are several seeds.
Per-step metrics take ``smooth`` (an EMA weight in [0, 1), 0 = raw; see
``_common.plot_curves``); validation accuracy is drawn raw: it is a measurement at a
checkpoint, and its last point is the number the summary tables report.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis import schema
from analysis.figures._common import (
    Colors,
    MissingData,
    colors_for,
    ema,
    finish,
    has_values,
    panels,
    plot_curves,
    reference_line,
    require_columns,
)
from analysis.io import val_columns


def validation_accuracy(metrics: pd.DataFrame, colors: Colors | None = None) -> Figure:
    """Figure 1: validation accuracy per benchmark vs step.

    One panel per benchmark; ``avg@k`` solid, held-out greedy accuracy dashed.
    """
    cols = [c for c in val_columns(metrics.columns) if has_values(metrics, c)]
    if not cols:
        raise MissingData("no validation metrics (val/<bench>/avg@k or greedy) were logged")
    parsed = [(c, *p) for c in cols if (p := schema.parse_val_metric(c)) is not None]
    benches = list(dict.fromkeys(b for _, b, _ in parsed))
    colors = colors_for(metrics, colors)
    fig, axes = panels(len(benches), title="Validation accuracy")
    for ax, bench in zip(axes, benches, strict=True):
        for col, b, kind in parsed:
            if b != bench:
                continue
            style = "--" if kind == "greedy" else "-"
            plot_curves(ax, metrics, col, colors, linestyle=style, suffix=f" {kind}")
        finish(ax, xlabel="step", ylabel="accuracy", title=bench)
    return fig


def token_entropy(metrics: pd.DataFrame, colors: Colors | None = None, *,
                  smooth: float = 0.0) -> Figure:
    """Figure 2: mean token entropy vs step, band from the 20th to the 80th percentile.

    With several seeds the line and both band edges are seed means; ``smooth`` smooths the
    line and both band edges alike.
    """
    require_columns(metrics, [schema.ENTROPY_MEAN], "token entropy")
    colors = colors_for(metrics, colors)
    fig, (ax,) = panels(1, size=(6.5, 4.0), title="Token entropy")
    plot_curves(ax, metrics, schema.ENTROPY_MEAN, colors, band=False, smooth=smooth)
    if has_values(metrics, schema.ENTROPY_P20) and has_values(metrics, schema.ENTROPY_P80):
        lo = _seed_mean(metrics, schema.ENTROPY_P20)
        hi = _seed_mean(metrics, schema.ENTROPY_P80)
        band = lo.merge(hi, on=["label", schema.STEP], suffixes=("_lo", "_hi"))
        for label, d in band.groupby("label", sort=False):
            lo_y, hi_y = d["mean_lo"].to_numpy(float), d["mean_hi"].to_numpy(float)
            if smooth > 0 and len(d) > 2:
                lo_y, hi_y = ema(lo_y, smooth), ema(hi_y, smooth)
            ax.fill_between(d[schema.STEP].to_numpy(float), lo_y, hi_y, color=colors[label],
                            alpha=0.2, linewidth=0, label=f"{label} p20-p80")
    finish(ax, xlabel="step", ylabel="entropy (nats)", title="mean token entropy, p20-p80 band")
    return fig


def _seed_mean(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    d = metrics[["label", schema.STEP, column]].dropna()
    out = d.groupby(["label", schema.STEP], sort=False)[column].mean().reset_index()
    return out.rename(columns={column: "mean"}).sort_values(["label", schema.STEP], kind="stable")


def response_length(metrics: pd.DataFrame, colors: Colors | None = None, *,
                    smooth: float = 0.0) -> Figure:
    """Figure 3: mean response length vs step; correct (solid) and incorrect (dashed)."""
    split = [schema.RESPONSE_LEN_CORRECT_MEAN, schema.RESPONSE_LEN_INCORRECT_MEAN]
    require_columns(metrics, [schema.RESPONSE_LEN_MEAN, *split], "response length")
    colors = colors_for(metrics, colors)
    show_all = has_values(metrics, schema.RESPONSE_LEN_MEAN)
    show_split = any(has_values(metrics, c) for c in split)
    fig, axes = panels(int(show_all) + int(show_split), title="Response length")
    it = iter(axes)
    if show_all:
        ax = next(it)
        plot_curves(ax, metrics, schema.RESPONSE_LEN_MEAN, colors, smooth=smooth)
        finish(ax, xlabel="step", ylabel="tokens", title="all responses")
    if show_split:
        ax = next(it)
        plot_curves(ax, metrics, schema.RESPONSE_LEN_CORRECT_MEAN, colors, suffix=" correct",
                    smooth=smooth)
        plot_curves(ax, metrics, schema.RESPONSE_LEN_INCORRECT_MEAN, colors, linestyle="--",
                    suffix=" incorrect", smooth=smooth)
        finish(ax, xlabel="step", ylabel="tokens", title="correct (solid) vs incorrect (dashed)")
    return fig


def reward_and_fill_rate(metrics: pd.DataFrame, colors: Colors | None = None, *,
                         smooth: float = 0.0) -> Figure:
    """Figure 4: reward and training accuracy vs step, and the dynamic-sampling fill rate.

    The fill-rate panel also shows the fraction of groups with mixed rewards (dashed), the
    signal that dynamic sampling keeps: when it falls, RL runs out of gradient.
    """
    wanted = [schema.REWARD_MEAN, schema.REWARD_ACC, schema.FILL_RATE, schema.MIXED_GROUP_FRAC]
    require_columns(metrics, wanted, "reward, accuracy or fill rate")
    colors = colors_for(metrics, colors)
    todo = []
    if has_values(metrics, schema.REWARD_MEAN):
        todo.append(("reward", "mean reward", [(schema.REWARD_MEAN, "-", "")]))
    if has_values(metrics, schema.REWARD_ACC):
        todo.append(("accuracy", "training accuracy", [(schema.REWARD_ACC, "-", "")]))
    sampling = [(c, s, suf) for c, s, suf in [(schema.FILL_RATE, "-", " fill rate"),
                                              (schema.MIXED_GROUP_FRAC, "--", " mixed groups")]
                if has_values(metrics, c)]
    if sampling:
        todo.append(("fraction", "dynamic sampling: fill rate, mixed groups", sampling))
    fig, axes = panels(len(todo), title="Reward and training accuracy")
    for ax, (ylabel, title, series) in zip(axes, todo, strict=True):
        for col, style, suffix in series:
            plot_curves(ax, metrics, col, colors, linestyle=style, suffix=suffix, smooth=smooth)
        finish(ax, xlabel="step", ylabel=ylabel, title=title)
    return fig


def advantage_balance(metrics: pd.DataFrame, colors: Colors | None = None, *,
                      smooth: float = 0.0) -> Figure:
    """Figure 7: positive vs negative token-advantage mass per step.

    Panels: sequence-level (GRPO) normalisation, token-level (component B) normalisation,
    and the net mass (positive + negative) of both. Positive mass solid, negative dashed
    (negative sums are logged as negative numbers). Token-level normalisation makes the
    net mass of every group zero; sequence-level lets long responses dominate one side.
    """
    seq = [schema.ADV_SEQ_POS_TOKEN_SUM, schema.ADV_SEQ_NEG_TOKEN_SUM]
    tok = [schema.ADV_POS_TOKEN_SUM, schema.ADV_NEG_TOKEN_SUM]
    require_columns(metrics, seq + tok, "advantage mass (adv/*_token_sum)")
    colors = colors_for(metrics, colors)
    todo = [(name, cols) for name, cols in [("sequence-level (GRPO)", seq),
                                            ("token-level (B)", tok)]
            if all(has_values(metrics, c) for c in cols)]
    if not todo:
        raise MissingData("advantage mass needs both the positive and the negative sum")
    fig, axes = panels(len(todo) + 1, title="Advantage balance")
    net = metrics.copy()
    for ax, (name, (pos, neg)) in zip(axes, todo, strict=False):
        plot_curves(ax, metrics, pos, colors, suffix=" positive", smooth=smooth)
        plot_curves(ax, metrics, neg, colors, linestyle="--", suffix=" negative", smooth=smooth)
        reference_line(ax, 0.0)
        finish(ax, xlabel="step", ylabel="sum of token advantages", title=name)
        net[f"net {name}"] = pd.to_numeric(net[pos]) + pd.to_numeric(net[neg])
    ax = axes[-1]
    for (name, _), style in zip(todo, ["-", "--"], strict=False):
        plot_curves(ax, net, f"net {name}", colors, linestyle=style, suffix=f" {name}",
                    smooth=smooth)
    reference_line(ax, 0.0)
    finish(ax, xlabel="step", ylabel="positive + negative", title="net advantage mass")
    return fig
