"""DAPO with forking tokens (arXiv 2506.01939): gradient only through the top-q entropy tokens
of the whole batch (all ranks together), Eq. 5's indicator H_t >= tau_rho^B; otherwise DAPO.
Its settings: algo.forking_quantile, algo.forking_normalizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_baseline
from .base import Baseline

if TYPE_CHECKING:
    from torch import Tensor


@register_baseline("forking")
class Forking(Baseline):
    source = "Beyond the 80/20 rule (forking tokens), arXiv 2506.01939"

    def token_masks(self, entropy: Tensor, mask: Tensor, cfg, ranks) -> tuple[Tensor, Tensor]:
        from .. import algo

        valid = ranks.cat(entropy[mask].double())
        thr = algo.quantile_1d(valid, 1.0 - cfg.forking_quantile, "paper") if valid.numel() else None
        loss_mask = mask & algo.forking_token_mask(entropy, mask, quantile=cfg.forking_quantile,
                                                   threshold=thr)
        # 'all': DAPO's 1/sum|o_i| times the indicator, so gradients keep DAPO's scale
        return loss_mask, loss_mask if cfg.forking_normalizer == "forking" else mask
