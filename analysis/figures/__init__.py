"""Figure functions: tables in, ``matplotlib.figure.Figure`` out (no pyplot, Agg canvas).

Each raises ``MissingData`` with a one-line reason when its data is absent, so a report
skips it instead of drawing an empty plot. Pass one ``color_map`` to all of them to keep a
run's or variant's colour stable across figures.
"""

from analysis.figures._common import MissingData, color_map
from analysis.figures.ablation import ablation_curves, ablation_deltas
from analysis.figures.evaluation import temperature_sweep
from analysis.figures.tokens import (
    adaptive_temperature,
    clipping_patterns,
    dual_entropy_tokens,
    ratio_vs_advantage,
    top_clipped_tokens,
)
from analysis.figures.training import (
    advantage_balance,
    response_length,
    reward_and_fill_rate,
    token_entropy,
    validation_accuracy,
)

__all__ = [
    "MissingData", "ablation_curves", "ablation_deltas", "adaptive_temperature",
    "advantage_balance", "clipping_patterns", "color_map", "dual_entropy_tokens",
    "ratio_vs_advantage", "response_length", "reward_and_fill_rate", "temperature_sweep",
    "token_entropy", "top_clipped_tokens", "validation_accuracy",
]  # fmt: skip
