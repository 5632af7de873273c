"""Stage 3, pure: from the old policy's entropies and the rewards, everything the PPO update
needs per token: the normalised entropy h, the advantages (B), the loss and normaliser masks,
the clip bounds (D) and the TIS weights. No model, no optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import algo
from ..baselines.base import Advantages, Baseline
from .batch import TrainBatch

if TYPE_CHECKING:
    from ..sections import AlgoConfig


@dataclass
class Targets:
    h: Tensor  # (B, T) normalised entropy in [-1, 1], 0 where masked
    adv: Advantages
    loss_mask: Tensor  # (B, T) bool: tokens the loss counts
    norm_mask: Tensor  # (B, T) bool: tokens the token-mean divides by
    eps_low: Tensor  # (B, T) clip bounds (after D when on)
    eps_high: Tensor
    tis: Tensor | None  # (B, T) truncated importance weights, or None
    stats: algo.EntropyStats  # batch-scope stats (A uses them at the next step)
    stats_info: dict[str, Any]
    ref_logp: Tensor | None = None  # (B, T) reference log-probs (algo.kl_coef > 0)


def normalised_entropy(entropy: Tensor, mask: Tensor, cfg: AlgoConfig, micro_rows: list[slice]):
    """(h, batch stats, stats info). Scope 'microbatch' (the released code's behaviour) takes
    the stats per fixed-row micro-batch for h; the batch stats are returned either way."""
    stats, info = algo.distributed_entropy_stats(entropy, mask, pivot=cfg.entropy_pivot,
                                                 mode=cfg.entropy_norm)
    if cfg.entropy_stats_scope == "microbatch":
        h = torch.zeros_like(entropy)
        for rows in micro_rows:
            mb_stats = algo.entropy_stats(entropy[rows], mask[rows], pivot=cfg.entropy_pivot,
                                          mode=cfg.entropy_norm)
            h[rows] = algo.normalized_entropy(entropy[rows], mb_stats)
    else:
        h = algo.normalized_entropy(entropy, stats)  # (B, T)
    return h.masked_fill(~mask, 0.0), stats, info


def clip_bounds(h: Tensor, cfg: AlgoConfig) -> tuple[Tensor, Tensor]:
    """(eps_low, eps_high) per token: D's entropy-conditioned bounds, or the constants."""
    if cfg.adaptive_clip:
        return algo.adaptive_clip_bounds(h, cfg.eps_low, cfg.eps_high, alpha=cfg.alpha)
    return torch.full_like(h, cfg.eps_low), torch.full_like(h, cfg.eps_high)


def compute_targets(batch: TrainBatch, old_logp: Tensor, entropy: Tensor, cfg: AlgoConfig,
                    baseline: Baseline, ranks, micro_rows: list[slice],
                    ref_logp: Tensor | None = None) -> Targets:
    mask = batch.mask
    h, stats, info = normalised_entropy(entropy, mask, cfg, micro_rows)
    adv = baseline.advantages(batch.scores, batch.group_ids, mask, cfg)
    loss_mask, norm_mask = baseline.token_masks(entropy, mask, cfg, ranks)
    eps_low, eps_high = clip_bounds(h, cfg)
    tis = None
    if cfg.tis_cap is not None:
        tis = algo.tis_weights(old_logp, batch.behaviour_logp, cfg.tis_cap)
    return Targets(h, adv, loss_mask, norm_mask, eps_low, eps_high, tis, stats, info, ref_logp)
