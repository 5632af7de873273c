"""Dr. GRPO (arXiv 2503.20783, Sec. 3.2): GRPO without its two biases. Advantages are the
reward minus the group mean (no division by the std), and the token losses are summed per
sequence and divided by a constant, the number of sequences times the generation budget
(rollout.max_new_tokens), never by a response's own length (as TRL's loss_type="dr_grpo" and
verl's seq-mean-token-sum-norm). No KL (the paper's runs use beta 0).

Under B the advantage is HAPO's token-level group average, std included: B replaces the
advantage estimator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_baseline
from .base import Baseline

if TYPE_CHECKING:
    from torch import Tensor


@register_baseline("dr-grpo")
class DrGrpo(Baseline):
    source = "Dr. GRPO, arXiv 2503.20783"
    scale_by_std = False
    defaults = {
        "algo.loss_agg": "seq-mean-token-sum",
        "algo.kl_coef": 0.0,
        "train.dynamic_sampling.enabled": False,
        "train.overlong.enabled": False,
    }
    fixed = ("algo.loss_agg", "train.dynamic_sampling.enabled")

    def local_normalizer(self, norm_mask: Tensor, recipe) -> Tensor:
        """Sequences x the generation budget: the same constant for every response."""
        return (norm_mask.sum(-1) > 0).sum() * recipe.rollout.max_new_tokens
