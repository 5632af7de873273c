"""The baseline contract, and DAPO (arXiv 2503.14476): group-normalised advantages (or HAPO's
token-level group average, B), every valid token in the loss, the recipe's aggregation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import algo


@dataclass
class Advantages:
    adv: Tensor  # (B, T) advantage of each token the loss uses (before C); 0 where masked
    seq_tok: Tensor  # (B, T) sequence-level GRPO advantage broadcast (the adv/seq_* metrics)
    fallback: Tensor  # (G,) bool: groups B fell back to sequence level; empty when B is off


class Baseline:
    name = "dapo"

    def advantages(self, scores: Tensor, group_ids: Tensor, mask: Tensor, cfg) -> Advantages:
        """scores (B,), group_ids (B,), mask (B, T) bool; cfg the recipe's algo section."""
        seq_adv = algo.grpo_advantages(scores, group_ids, eps=cfg.adv_eps)  # (B,)
        seq_tok = seq_adv[:, None].expand_as(mask).masked_fill(~mask, 0.0)  # (B, T)
        if not cfg.token_level_advantage:
            return Advantages(seq_tok, seq_tok, torch.zeros(0))
        adv, fallback = algo.token_level_group_advantages(
            scores, mask, group_ids, eps=cfg.adv_eps, fallback_threshold=cfg.fallback_threshold,
            return_fallback=True,
        )
        return Advantages(adv, seq_tok, fallback)

    def token_masks(self, entropy: Tensor, mask: Tensor, cfg, ranks) -> tuple[Tensor, Tensor]:
        """(tokens the loss counts, tokens the token-mean divides by), both (B, T) bool."""
        return mask, mask

    def loss_agg(self, cfg) -> str:
        return cfg.loss_agg
