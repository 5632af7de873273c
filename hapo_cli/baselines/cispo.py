"""CISPO (MiniMax-M1, arXiv 2506.13585, Sec. 3.1): the clipped importance weight, under a
stop-gradient, times the log-prob (`algo.cispo_policy_loss`), token-mean over the batch. The
paper sets no lower bound on the weight (eps_low 1: the bound is 0) and tunes only eps_high,
whose value it does not publish; 0.28 is Trinity-RFT's CISPO default (DAPO's clip-higher).
The rest is DAPO's (the paper builds on DAPO's token-level loss and dynamic sampling).

C and D apply as on DAPO: the weight and its bounds are per token (D's bounds clip the weight;
C reads the token's ratio against them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_baseline
from .base import Baseline

if TYPE_CHECKING:
    from torch import Tensor


@register_baseline("cispo")
class Cispo(Baseline):
    source = "CISPO, MiniMax-M1, arXiv 2506.13585"
    defaults = {
        "algo.loss_agg": "token-mean",
        "algo.eps_low": 1.0,
        "algo.eps_high": 0.28,
        "algo.kl_coef": 0.0,
    }

    def loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
             eps_low: Tensor, eps_high: Tensor, cfg, *, normalizer: float, h: Tensor,
             adv_before: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        from .. import algo

        return algo.cispo_policy_loss(logp, old_logp, adv, mask, eps_low, eps_high,
                                      agg=self.loss_agg(cfg), normalizer=normalizer)
