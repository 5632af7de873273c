"""The baselines' other objectives: GSPO's sequence-level ratio, CISPO's clipped stop-gradient
importance weight and the KL penalty to a reference policy; they aggregate with
`loss.aggregate`, as `policy_loss` does.

Metric keys are the run-directory names of `analysis.schema` and combine across micro-batches
as `loss.py` says (means weighted by `valid_tokens`, sums and counts added).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import LOG_RATIO_CLAMP, aggregate, importance_ratio
from .loss import ratio_metrics as _metrics

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
# verl's compute_policy_loss_gspo clamps the combined log-ratio from above at 10 before exp
GSPO_LOG_RATIO_MAX = 10.0


def _check(name: str, *tensors: Tensor) -> None:
    if len({tuple(t.shape) for t in tensors}) != 1 or tensors[0].dim() != 2:
        raise ValueError(f"{name}: all inputs must be the same (B, T); got "
                         f"{', '.join(str(tuple(t.shape)) for t in tensors)}")


def gspo_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
    eps_low: float | Tensor, eps_high: float | Tensor, agg: str = "seq-mean-token-mean", *,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071, Eq. 5-7): one importance ratio per sequence, clipped per sequence.

        s_i   = exp(mean_t(logp_it - old_logp_it))          over the valid tokens of row i
        s_it  = sg[s_i] * pi_it / sg[pi_it]                 (value s_i, gradient s_i * grad logp_it)
        L_it  = max(-A_it s_it, -A_it clip(s_it, 1 - eps_low, 1 + eps_high))
    aggregated by `agg` (GSPO's objective is the mean over sequences of the token mean). The
    log of s_it is clamped above at 10 before exp, as verl's compute_policy_loss_gspo. No dual
    clip: the sequence ratio is a length-normalised geometric mean and stays near 1.
    A token counts as clipped when its sequence's clip changed the gradient (sign of A).
    All (B, T); returns (loss 0-dim, detached metrics).
    """
    _check("gspo_policy_loss", logp, old_logp, adv, mask)
    mask = mask.bool()
    wd = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=wd, device=logp.device)
    lp = logp.to(wd)  # (B, T)
    log_ratio = torch.where(mask, lp - old_logp.detach().to(wd), zero)  # (B, T)
    seq_log_ratio = log_ratio.sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # (B,)
    log_s = (lp - lp.detach() + seq_log_ratio.detach()[:, None]).clamp(max=GSPO_LOG_RATIO_MAX)
    ratio = torch.where(mask, log_s.exp(), zero + 1)  # (B, T): s_i on every valid token
    a = torch.where(mask, adv.detach().to(wd), zero)  # (B, T)
    lo = torch.as_tensor(1 - eps_low, dtype=wd, device=ratio.device)
    hi = torch.as_tensor(1 + eps_high, dtype=wd, device=ratio.device)
    clipped = torch.minimum(torch.maximum(ratio, lo), hi)  # (B, T)
    per_token = torch.maximum(-a * ratio, -a * clipped)  # (B, T)
    loss = aggregate(per_token, mask, agg, normalizer)
    with torch.no_grad():
        r = ratio.detach()
        low, high = (a < 0) & (r < lo), (a > 0) & (r > hi)
        metrics = _metrics(loss, r, a, mask, low, high)
    return loss, metrics


def cispo_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
    eps_low: float | Tensor, eps_high: float | Tensor, agg: str = "token-mean", *,
    normalizer: float | Tensor | None = None, log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4-5): a clipped, stop-gradient importance
    weight times the log-prob, so no token's gradient is ever dropped.

        r_t  = exp(clamp(logp_t - old_logp_t, -20, 20))
        L_t  = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * logp_t
    aggregated by `agg` (the paper: token mean over the batch). eps may be (B, T) tensors (D).
    clip_frac_low / clip_frac_high: tokens whose weight was clipped on that side (any A: the
    clip always changes the weight). All (B, T); returns (loss 0-dim, detached metrics).
    """
    _check("cispo_policy_loss", logp, old_logp, adv, mask)
    mask = mask.bool()
    wd = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=wd, device=logp.device)
    ratio = importance_ratio(logp.detach(), old_logp, mask, log_ratio_clamp)  # (B, T) detached
    lo = torch.as_tensor(1 - eps_low, dtype=wd, device=ratio.device)
    hi = torch.as_tensor(1 + eps_high, dtype=wd, device=ratio.device)
    weight = torch.minimum(torch.maximum(ratio, lo), hi)  # (B, T), no gradient
    a = torch.where(mask, adv.detach().to(wd), zero)  # (B, T)
    per_token = torch.where(mask, -weight * a * logp.to(wd), zero)  # (B, T)
    loss = aggregate(per_token, mask, agg, normalizer)
    with torch.no_grad():
        metrics = _metrics(loss, ratio, a, mask, ratio < lo, ratio > hi)
    return loss, metrics


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs
    (Schulman, "Approximating KL divergence", 2020; verl's kl_penalty). With d = logp - ref:

      k1:  d                                   (unbiased, high variance, can be negative)
      k2:  d^2 / 2                             (its gradient is d * grad logp)
      k3:  e^{-d} + d - 1, e^{-d} with d clamped to [-20, 20], result clamped to [-10, 10]
      k3+: k3's value with k2's gradient (straight-through: k2 - sg[k2] + sg[k3]), as verl

    logp (B, T) with grad, ref_logp (B, T) (detached here) -> (B, T) in the promoted dtype;
    padding is the caller's to mask.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: kind={kind!r} is not one of: {', '.join(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"kl_penalty: logp {tuple(logp.shape)} != ref_logp "
                         f"{tuple(ref_logp.shape)}")
    wd = torch.promote_types(logp.dtype, torch.float32)
    d = logp.to(wd) - ref_logp.detach().to(wd)  # (B, T)
    if kind == "k1":
        return d
    k2 = 0.5 * d.square()
    if kind == "k2":
        return k2
    neg = (-d).clamp(-20.0, 20.0)  # log(pi_ref / pi_theta)
    k3 = (neg.exp() - neg - 1).clamp(-10.0, 10.0)
    if kind == "k3":
        return k3
    return k2 - k2.detach() + k3.detach()


__all__ = ["KL_ESTIMATORS", "cispo_policy_loss", "gspo_policy_loss", "kl_penalty"]
