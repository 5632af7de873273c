"""Figures from ``hapo evaluate`` rows (figure 10 of the report, numbered as in
``analysis/report.py``)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis import schema
from analysis.figures._common import Colors, MissingData, colors_for, finish, panels
from analysis.tables import accuracy_column, latest_checkpoint


def _is_adaptive(d: pd.DataFrame) -> pd.Series:
    if schema.EVAL_ADAPTIVE in d.columns:
        return d[schema.EVAL_ADAPTIVE].fillna(False).astype(bool)
    if schema.EVAL_SETTING in d.columns:
        return d[schema.EVAL_SETTING].astype(str).eq("adaptive")
    return pd.Series(False, index=d.index)


def temperature_sweep(evals: pd.DataFrame, colors: Colors | None = None) -> Figure:
    """Figure 10: accuracy and critical tokens vs sampling temperature, fixed vs adaptive.

    Uses each run's latest evaluated checkpoint; seeds of a label are averaged per
    temperature. Fixed temperatures: solid line with dots. Adaptive rows with a base
    temperature: dashed line with squares at that base temperature; adaptive rows without
    one: a dashed horizontal line. Top row accuracy (``avg@k``, else ``pass@1``), bottom row
    mean critical tokens per response, one column per benchmark. A panel whose values span
    less than 10 % of their size includes zero (``_common.honest_ylim``): critical tokens
    that move from 4.194 to 4.199 draw a flat line, not a steep trend.
    """
    if evals is None or not len(evals) or schema.EVAL_BENCHMARK not in evals.columns:
        raise MissingData(f"no eval rows ({schema.EVAL_DIR}/*.jsonl from `hapo evaluate`)")
    acc = accuracy_column(evals)
    if acc is None:
        raise MissingData("eval rows have no accuracy column (avg@k or pass@1)")
    d = latest_checkpoint(evals).copy()
    d["_T"] = (pd.to_numeric(d[schema.EVAL_TEMPERATURE], errors="coerce")
               if schema.EVAL_TEMPERATURE in d.columns else float("nan"))
    d["_adaptive"] = _is_adaptive(d)
    if not (d["_T"].notna() | d["_adaptive"]).any():
        raise MissingData("eval rows have neither a temperature nor an adaptive setting")
    rows = [(acc, "accuracy")]
    if schema.EVAL_CRITICAL_TOKENS in d.columns and d[schema.EVAL_CRITICAL_TOKENS].notna().any():
        rows.append((schema.EVAL_CRITICAL_TOKENS, "critical tokens per response"))
    benches = list(dict.fromkeys(d[schema.EVAL_BENCHMARK].astype(str)))
    colors = colors_for(d, colors)
    fig, axes = panels(len(rows) * len(benches), ncols=len(benches),
                       title="Accuracy and critical tokens vs sampling temperature")
    for r, (col, ylabel) in enumerate(rows):
        d[col] = pd.to_numeric(d[col], errors="coerce")
        for b, bench in enumerate(benches):
            ax = axes[r * len(benches) + b]
            part = d[d[schema.EVAL_BENCHMARK].astype(str) == bench]
            for label, g in part.groupby("label", sort=False):
                fixed = g[~g["_adaptive"] & g["_T"].notna()].groupby("_T")[col].mean()
                if len(fixed):
                    ax.plot(fixed.index.to_numpy(float), fixed.to_numpy(float), "o-",
                            color=colors[label], label=f"{label} fixed T")
                ada = g[g["_adaptive"]]
                with_t = ada[ada["_T"].notna()].groupby("_T")[col].mean()
                if len(with_t):
                    ax.plot(with_t.index.to_numpy(float), with_t.to_numpy(float), "s--",
                            color=colors[label], label=f"{label} adaptive")
                no_t = ada.loc[ada["_T"].isna(), col].dropna()
                if len(no_t):
                    ax.axhline(float(no_t.mean()), color=colors[label], linestyle="--",
                               label=f"{label} adaptive")
            finish(ax, xlabel="sampling temperature", ylabel=ylabel, title=bench,
                   empty=f"no {ylabel} for {bench} in the eval rows")
    return fig
