"""GRPO as in DeepSeekMath (arXiv 2402.03300, Eq. 3 and Sec. 4.1): sequence-level advantages
normalised by the group's std, the per-sequence mean of the token losses, a KL penalty to the
reference policy in the loss with the k3 estimator (Eq. 4) and beta 0.04, no dynamic sampling and
no overlong shaping. The KL term itself is the learner's (`algo.kl_coef`, any baseline)."""

from __future__ import annotations

from . import register_baseline
from .base import Baseline


@register_baseline("grpo")
class Grpo(Baseline):
    source = "GRPO, DeepSeekMath, arXiv 2402.03300"
    defaults = {
        "algo.loss_agg": "seq-mean-token-mean",
        "algo.kl_coef": 0.04,
        "algo.kl_estimator": "k3",
        "train.dynamic_sampling.enabled": False,
        "train.overlong.enabled": False,
    }
    fixed = ("algo.loss_agg", "train.dynamic_sampling.enabled")
