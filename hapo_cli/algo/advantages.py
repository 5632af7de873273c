"""Group advantages: GRPO (sequence level) and HAPO's token-level group average (component B).

All vectorised over groups with `torch.unique(return_inverse=True)` + `index_add_`; no Python
loop over groups or tokens. Group ids may be any integer tensor (not necessarily contiguous).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_index(group_ids: Tensor, b: int) -> tuple[Tensor, int]:
    if group_ids.dim() != 1 or group_ids.shape[0] != b:
        raise ValueError(f"group_ids must be ({b},), got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) in 0..num_groups-1
    num_groups = int(inverse.max()) + 1 if b > 0 else 0
    return inverse, num_groups


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segment_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def grpo_advantages(scores: Tensor, group_ids: Tensor, eps: float = 1e-6, *,
                    scale_by_std: bool = True) -> Tensor:
    """Sequence-level GRPO advantage A_i = (r_i - mean_g) / (std_g + eps).

    scores (B,), group_ids (B,) -> (B,). std is the unbiased (n-1) std of the group, as verl;
    a group of one uses mean 0 and std 1 (verl), i.e. A_i = r_i / (1 + eps).
    `scale_by_std=False`: A_i = r_i - mean_g, Dr. GRPO (arXiv 2503.20783, Sec. 3.2; verl's
    norm_adv_by_std_in_grpo=False); a group of one then gives A_i = r_i.
    Naive: for each group g: s = scores[ids == g]; A = (s - s.mean()) / (s.std() + eps).
    """
    if scores.dim() != 1:
        raise ValueError(f"grpo_advantages: scores must be (B,), got {tuple(scores.shape)}")
    b = scores.shape[0]
    inverse, num_groups = _group_index(group_ids, b)
    # float64 on (B,)-sized vectors: in float32 a zero-std group's mean can miss its scores by
    # one ulp (~1e-8), which eps = 1e-6 would turn into advantages of ~1e-2 instead of 0.
    r = scores.double()  # (B,)
    ones = torch.ones_like(r)
    count = _segment_sum(ones, inverse, num_groups)  # (G,)
    mean = _segment_sum(r, inverse, num_groups) / count  # (G,)
    sq = _segment_sum((r - mean[inverse]) ** 2, inverse, num_groups)  # (G,)
    std = (sq / (count - 1).clamp_min(1)).sqrt()  # (G,) unbiased
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    if not scale_by_std:
        return (r - mean[inverse]).to(_out_dtype(scores))
    return ((r - mean[inverse]) / (std[inverse] + eps)).to(_out_dtype(scores))


def token_level_group_advantages(
    scores: Tensor, mask: Tensor, group_ids: Tensor, eps: float = 1e-6,
    fallback_threshold: float = 5.0, *, return_fallback: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Component B: A_t = (r_i - mu_g) / (sigma_g + eps) for every valid token t of response i.

    mu_g, sigma_g are the mean and std over all valid tokens of group g, each token carrying
    its response's score (length-weighted): with L_i = valid tokens of response i,
        mu_g = sum_i L_i r_i / sum_i L_i,   sigma_g^2 = sum_i L_i (r_i - mu_g)^2 / sum_i L_i.
    sigma_g is the population std (divide by the token count), as the released code
    (`std(unbiased=False)`): the "samples" are tokens, thousands per group, so the Bessel
    correction is negligible and population std keeps mu_g/sigma_g a plain weighted moment.
    Advantages then sum to zero over a group's valid tokens.

    Where any valid token of a group has |A| >= fallback_threshold, the whole group uses the
    GRPO sequence advantage broadcast over its valid tokens (the released code's check also
    looks at padding; ours only at valid tokens). A group with no valid tokens gets 0.

    scores (B,), mask (B, T) bool, group_ids (B,) -> adv (B, T), 0 on padding; with
    return_fallback=True also (num_groups,) bool: which groups fell back, in the order of
    `torch.unique(group_ids)` (ascending ids).
    """
    if scores.dim() != 1 or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"token_level_group_advantages: need scores (B,) and mask (B, T), got "
            f"{tuple(scores.shape)} and {tuple(mask.shape)}"
        )
    b = scores.shape[0]
    inverse, num_groups = _group_index(group_ids, b)
    mask = mask.bool()
    r = scores.double()  # (B,) float64 for the group moments, see grpo_advantages
    lengths = mask.sum(dim=1).to(r.dtype)  # (B,) L_i
    tokens = _segment_sum(lengths, inverse, num_groups)  # (G,)
    denom = tokens.clamp_min(1)
    mu = _segment_sum(lengths * r, inverse, num_groups) / denom  # (G,)
    var = _segment_sum(lengths * (r - mu[inverse]) ** 2, inverse, num_groups) / denom  # (G,)
    seq_adv = (r - mu[inverse]) / (var.sqrt()[inverse] + eps)  # (B,) token adv of response i
    too_big = (seq_adv.abs() >= fallback_threshold) & (lengths > 0)  # (B,)
    fallback = _segment_sum(too_big.to(r.dtype), inverse, num_groups) > 0  # (G,)
    grpo = grpo_advantages(scores.double(), group_ids, eps)  # (B,)
    per_response = torch.where(fallback[inverse], grpo, seq_adv).to(_out_dtype(scores))  # (B,)
    zero = torch.zeros((), dtype=per_response.dtype, device=r.device)
    adv = torch.where(mask, per_response.unsqueeze(1), zero)  # (B, T)
    if return_fallback:
        return adv, fallback
    return adv
