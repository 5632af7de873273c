"""GRPO (arXiv 2402.03300) as the letters' baseline. Its advantages (sequence-level, group
normalised) and token selection are DAPO's; what makes it GRPO are recipe values, written in
`recipes/tiny/grpo.yaml`: a per-sequence mean of the token losses
(`algo.loss_agg: seq-mean-token-mean`), symmetric clipping, no dynamic sampling and no
overlong shaping. The recipe's aggregation is used as given (never silently replaced)."""

from __future__ import annotations

from .base import Baseline


class Grpo(Baseline):
    name = "grpo"
