"""GSPO (arXiv 2507.18071): the importance ratio of a whole sequence,
s_i = exp(mean_t(logp - old_logp)), clipped per sequence to [1 - 3e-4, 1 + 4e-4] (the paper's
ranges, Sec. 5.1), the mean over sequences of the token mean (`algo.gspo_policy_loss`); no KL,
no dynamic sampling.

HAPO's A and B apply (sampling, and the advantage every token of a sequence carries). C and D
act on each token's ratio and clip bounds, which GSPO replaces by one ratio and one bound per
sequence: they are refused at load rather than given a meaning the paper does not define."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_baseline
from .base import Baseline

if TYPE_CHECKING:
    from torch import Tensor


@register_baseline("gspo")
class Gspo(Baseline):
    source = "GSPO, arXiv 2507.18071"
    defaults = {
        "algo.loss_agg": "seq-mean-token-mean",
        "algo.eps_low": 3e-4,
        "algo.eps_high": 4e-4,
        "algo.kl_coef": 0.0,
        "train.dynamic_sampling.enabled": False,
        "train.overlong.enabled": False,
    }
    fixed = ("algo.loss_agg",)
    _why = "GSPO has one ratio and one clip range per sequence, not per token"
    refuses = {"C": _why, "D": _why}

    def loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
             eps_low: Tensor, eps_high: Tensor, cfg, *, normalizer: float, h: Tensor,
             adv_before: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        from .. import algo

        return algo.gspo_policy_loss(logp, old_logp, adv, mask, cfg.eps_low, cfg.eps_high,
                                     agg=self.loss_agg(cfg), normalizer=normalizer)
