"""DAPO with forking tokens (arXiv 2506.01939): gradient only through the top-q entropy tokens
of the whole batch (all ranks together), Eq. 5's indicator H_t >= tau_rho^B; otherwise DAPO.
Its settings: the recipe's `algo.forking` section (`ForkingConfig`: quantile, normalizer; before
they were `algo.forking_quantile` and `algo.forking_normalizer`, still read)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..section_base import _Section
from . import register_baseline
from .base import Baseline

if TYPE_CHECKING:
    from torch import Tensor


class ForkingConfig(_Section):
    quantile: float = Field(
        default=0.2, gt=0, le=1,
        description="Fraction q of highest-entropy tokens trained (the paper's 20 %); the "
        "threshold is the (1 - q) entropy quantile over the whole batch, all ranks together.",
    )
    normalizer: Literal["all", "forking"] = Field(
        default="all",
        description="Token-mean denominator. 'all': every valid token, as the objective of "
        "arXiv 2506.01939 (DAPO's 1/sum|o_i| times the indicator H_t >= tau), so gradients keep "
        "DAPO's scale. 'forking': only the forking tokens (about 1/q times larger).",
    )


@register_baseline("forking")
class Forking(Baseline):
    source = "Beyond the 80/20 rule (forking tokens), arXiv 2506.01939"
    Config = ForkingConfig
    renamed = {"forking_quantile": "quantile", "forking_normalizer": "normalizer"}

    def token_masks(self, entropy: Tensor, mask: Tensor, cfg, ranks) -> tuple[Tensor, Tensor]:
        from .. import algo

        q = self.settings(cfg).quantile
        valid = ranks.cat(entropy[mask].double())
        thr = algo.quantile_1d(valid, 1.0 - q, "paper") if valid.numel() else None
        loss_mask = mask & algo.forking_token_mask(entropy, mask, quantile=q, threshold=thr)
        # 'all': DAPO's 1/sum|o_i| times the indicator, so gradients keep DAPO's scale
        return loss_mask, loss_mask if self.settings(cfg).normalizer == "forking" else mask
