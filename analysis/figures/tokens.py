"""Token-level figures from ``tokens/step-*.parquet`` (figures 5, 6, 8, 9, 11 of the report,
numbered as in ``analysis/report.py``).

They take the long token table of ``analysis.io.stack_tokens`` (``run, label, seed`` plus
``schema.TOKEN_COLUMNS``). Token samples are a sample: counts are counts in the sample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import schema
from analysis.colors import HIGH_ENTROPY, LOW_ENTROPY
from analysis.figures._common import (
    Colors,
    MissingData,
    colors_for,
    display_token,
    finish,
    has_values,
    panels,
    plot_curves,
    reference_line,
    stairs_hist,
    subsample,
)

MAX_POINTS = 4000  # per label and panel in scatter plots


def _need_tokens(tokens: pd.DataFrame, columns: list[str], what: str) -> pd.DataFrame:
    if tokens is None or not len(tokens):
        raise MissingData(f"no token samples (tokens/{schema.TOKENS_GLOB}) for {what}")
    missing = [c for c in columns if c not in tokens.columns or not tokens[c].notna().any()]
    if missing:
        raise MissingData(f"token samples lack {', '.join(missing)} for {what}")
    return tokens


def _edges(values: np.ndarray, bins: int = 40) -> np.ndarray:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def clipping_patterns(
    metrics: pd.DataFrame, tokens: pd.DataFrame | None = None, colors: Colors | None = None,
    *, smooth: float = 0.0,
) -> Figure:
    """Figure 5: where the PPO clip binds.

    Top row: low-side (ratio < 1 - eps_low, A < 0) and high-side (ratio > 1 + eps_high,
    A > 0) clip fraction vs step, split into high-entropy (h > 0, solid) and low-entropy
    (h <= 0, dashed) tokens; the unsplit fraction (dotted) when the split was not logged.
    Bottom row, when token samples exist: density histograms of the entropy of the tokens
    clipped on the low side and on the high side. Both sides are always drawn: a side with
    nothing to show (no token clipped there) says so in its panel.
    """
    sides = {
        "low": (schema.CLIP_FRAC_LOW_HI_ENT, schema.CLIP_FRAC_LOW_LO_ENT, schema.CLIP_FRAC_LOW),
        "high": (schema.CLIP_FRAC_HIGH_HI_ENT, schema.CLIP_FRAC_HIGH_LO_ENT,
                 schema.CLIP_FRAC_HIGH),
    }
    curves = any(has_values(metrics, c) for cols in sides.values() for c in cols)
    sampled = pd.DataFrame()
    if tokens is not None and len(tokens) and {"clip_side", "entropy"} <= set(tokens.columns):
        sampled = tokens[pd.to_numeric(tokens["entropy"], errors="coerce").notna()]
    tok = sampled[sampled["clip_side"].isin(["low", "high"])] if len(sampled) else sampled
    if not curves and not len(tok):
        raise MissingData("no clip fractions (actor/clip_frac_*) and no clipped token samples")
    colors = colors_for(metrics, colors, tok)
    hists = bool(len(sampled))
    fig, axes = panels(2 * (int(curves) + int(hists)), ncols=2, title="Clipping patterns")
    it = iter(axes)
    bound = {"low": "1 - eps_low (A < 0)", "high": "1 + eps_high (A > 0)"}
    for side in ("low", "high") if curves else ():
        ax = next(it)
        hi_col, lo_col, all_col = sides[side]
        if has_values(metrics, hi_col) or has_values(metrics, lo_col):
            plot_curves(ax, metrics, hi_col, colors, suffix=" high entropy", smooth=smooth)
            plot_curves(ax, metrics, lo_col, colors, linestyle="--", suffix=" low entropy",
                        smooth=smooth)
        else:
            plot_curves(ax, metrics, all_col, colors, linestyle=":", suffix=" all tokens",
                        smooth=smooth)
        finish(ax, xlabel="step", ylabel="fraction of tokens clipped",
               title=f"{side}-side clip at {bound[side]}",
               empty=f"no {side}-side clip fraction logged\n({all_col}*)")
    if hists:
        edges = _edges(pd.to_numeric((tok if len(tok) else sampled)["entropy"]).to_numpy(float))
        for side in ("low", "high"):
            ax = next(it)
            d = tok[tok["clip_side"] == side] if len(tok) else tok
            for label, g in d.groupby("label", sort=False):
                stairs_hist(ax, pd.to_numeric(g["entropy"]).to_numpy(float), edges,
                            color=colors[label], label=f"{label} (n={len(g)})")
            finish(ax, xlabel="token entropy (nats)", ylabel="density",
                   title=f"entropy of {side}-side clipped tokens",
                   empty=f"no sampled token was clipped on the {side} side\n"
                         f"({_sampled_where(sampled)})")
    return fig


def _sampled_where(tokens: pd.DataFrame) -> str:
    """``"1024 tokens sampled at 4 steps of 4 runs"``."""
    steps = tokens[schema.STEP].nunique() if schema.STEP in tokens.columns else 0
    runs = tokens["run"].nunique() if "run" in tokens.columns else 1
    return (f"{len(tokens)} tokens sampled at {steps} step{'s' * (steps != 1)} of {runs} "
            f"run{'s' * (runs != 1)}")


def top_clipped_tokens(tokens: pd.DataFrame, colors: Colors | None = None, *, top: int = 20,
                       max_labels: int = 4) -> Figure:
    """Figure 6: the ``top`` token strings most often clipped on each side, as bar charts.

    One row per label (the first ``max_labels``), low side left, high side right. Spaces
    show as '·'.
    """
    tokens = _need_tokens(tokens, ["clip_side", "token_text"], "the most clipped tokens")
    clipped = tokens[tokens["clip_side"].isin(["low", "high"])]
    if not len(clipped):
        raise MissingData("no clipped tokens in the token samples")
    colors = colors_for(tokens, colors)
    labels = list(dict.fromkeys(clipped["label"]))[:max_labels]
    fig, axes = panels(2 * len(labels), ncols=2, size=(5.0, 0.22 * top + 1.2),
                       title=f"Most clipped tokens (top {top})")
    for i, label in enumerate(labels):
        for j, side in enumerate(("low", "high")):
            ax = axes[2 * i + j]
            d = clipped[(clipped["label"] == label) & (clipped["clip_side"] == side)]
            counts = d["token_text"].astype(str).value_counts().head(top)
            y = np.arange(len(counts))
            ax.barh(y, counts.to_numpy(), color=colors[label])
            ax.set_yticks(y, [display_token(t) for t in counts.index])
            ax.invert_yaxis()
            finish(ax, xlabel="times clipped", ylabel="token",
                   title=f"{label}: {side}-side", legend=False,
                   empty=f"no {side}-side clipped tokens in {label}'s samples")
    return fig


def ratio_vs_advantage(tokens: pd.DataFrame, colors: Colors | None = None) -> Figure:
    """Figure 8: importance ratio vs advantage, high-entropy (h > 0) and low-entropy tokens.

    Scatter of ``adv`` (before C) against ``ratio``, at most ``MAX_POINTS`` per label and
    panel (a fixed-seed sample). The dotted line is ratio = 1.
    """
    tokens = _need_tokens(tokens, ["ratio", "adv", "h"], "ratio vs advantage")
    d = tokens.copy()
    for c in ("ratio", "adv", "h"):
        d[c] = pd.to_numeric(d[c], errors="coerce")
    d = d.dropna(subset=["ratio", "adv", "h"])
    if not len(d):
        raise MissingData("no token sample has ratio, adv and h together")
    colors = colors_for(tokens, colors)
    fig, axes = panels(2, title="Importance ratio vs advantage")
    for ax, (name, part) in zip(axes, [("high-entropy tokens (h > 0)", d[d["h"] > 0]),
                                       ("low-entropy tokens (h <= 0)", d[d["h"] <= 0])],
                                strict=True):
        for label, g in part.groupby("label", sort=False):
            g = subsample(g, MAX_POINTS)
            ax.scatter(g["adv"].to_numpy(float), g["ratio"].to_numpy(float), s=4, alpha=0.4,
                       color=colors[label], label=f"{label} (n={len(g)})", rasterized=True)
        reference_line(ax, 1.0)
        finish(ax, xlabel="advantage (before C)", ylabel="importance ratio", title=name,
               empty=f"no sampled token with {name[name.index('(') + 1:-1]}", honest=False)
    return fig


def adaptive_temperature(
    tokens: pd.DataFrame, metrics: pd.DataFrame | None = None, colors: Colors | None = None,
    *, smooth: float = 0.0,
) -> Figure:
    """Figure 9: the per-token sampling temperature (component A).

    Panels: density histogram of T_t; T_t against token entropy (scatter, sampled); and the
    batch mean temperature vs step when ``rollout/temperature_mean`` was logged.
    """
    tokens = _need_tokens(tokens, ["temperature", "entropy"], "adaptive temperature")
    d = tokens.copy()
    d["temperature"] = pd.to_numeric(d["temperature"], errors="coerce")
    d["entropy"] = pd.to_numeric(d["entropy"], errors="coerce")
    d = d.dropna(subset=["temperature", "entropy"])
    if not len(d) or np.ptp(d["temperature"].to_numpy(float)) == 0:
        t = d["temperature"].iloc[0] if len(d) else float("nan")
        raise MissingData(f"per-token temperature is constant (T={t:g}): component A is off "
                          "in every run")
    colors = colors_for(tokens, colors, metrics)
    curve = metrics is not None and has_values(metrics, schema.TEMPERATURE_MEAN)
    fig, axes = panels(2 + int(curve), title="Adaptive temperature")
    edges = _edges(d["temperature"].to_numpy(float))
    for label, g in d.groupby("label", sort=False):
        stairs_hist(axes[0], g["temperature"].to_numpy(float), edges, color=colors[label],
                    label=f"{label} (n={len(g)})")
        s = subsample(g, MAX_POINTS)
        axes[1].scatter(s["entropy"].to_numpy(float), s["temperature"].to_numpy(float), s=4,
                        alpha=0.4, color=colors[label], label=label, rasterized=True)
    finish(axes[0], xlabel="token temperature T_t", ylabel="density",
           title="distribution of T_t")
    finish(axes[1], xlabel="token entropy (nats)", ylabel="token temperature T_t",
           title="T_t vs entropy", honest=False)  # a relation: its detail is the point
    if curve:
        assert metrics is not None  # curve implies it
        plot_curves(axes[2], metrics, schema.TEMPERATURE_MEAN, colors, smooth=smooth)
        finish(axes[2], xlabel="step", ylabel="mean T_t", title="mean sampling temperature")
    return fig


def dual_entropy_tokens(table: pd.DataFrame) -> Figure:
    """Figure 11: token strings found among both the highest- and lowest-entropy tokens.

    ``table`` is ``analysis.tables.dual_entropy_table``; grouped horizontal bars of the
    high-entropy and low-entropy counts per token.
    """
    if table is None or not len(table):
        raise MissingData("no token string occurs among both the highest- and the "
                          "lowest-entropy sampled tokens (or there are no token samples)")
    n = len(table)
    fig, (ax,) = panels(1, size=(6.5, 0.3 * n + 1.5), title="Dual-entropy tokens")
    y = np.arange(n)
    pct = round(100 * float(table.attrs.get("frac", 0.2)))
    ax.barh(y - 0.2, table["high_count"].to_numpy(), height=0.4, color=HIGH_ENTROPY,
            label=f"high entropy (top {pct}%)")
    ax.barh(y + 0.2, table["low_count"].to_numpy(), height=0.4, color=LOW_ENTROPY,
            label=f"low entropy (bottom {pct}%)")
    ax.set_yticks(y, [display_token(t) for t in table["token"]])
    ax.invert_yaxis()
    finish(ax, xlabel="count in token samples", ylabel="token",
           title="tokens that are both high- and low-entropy")
    return fig
