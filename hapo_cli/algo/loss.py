"""PPO clipped surrogate with dual clip, and HAPO's loss-side components C and D.

Metric keys are the run-directory names of `analysis.schema`. Aggregation across
micro-batches (and ranks): every metric is a detached 0-dim tensor computed on the local
micro-batch. Fractions (`clip_frac_*`, `dual_clip_frac`, `c_amplified_frac`, `c_damped_frac`)
and means (`ratio_mean`, `ratio_dev_mean`) are over the local valid tokens: combine them as
`sum(m * valid_tokens) / sum(valid_tokens)`. Sums and counts (ADDITIVE: `adv_c_*`,
`valid_tokens`) just add. `pg_loss` is the returned loss: with a global `normalizer` the
micro-batch losses add up to the mini-batch loss (sum them); with the local default they are
local means (weight by valid_tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis import schema

from .entropy import quantile_1d

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOG_RATIO_CLAMP = 20.0
# Advantages are unit-scale (normalised by a group std), so an |A| below this is float noise,
# not a sign: C's `1 + beta h` at h = -1 is 0 in exact arithmetic and 1e-7 after rounding, and
# equal runs that differ only in padding width must not count such a token on different sides.
ADV_SIGN_TOL = 1e-6
# metrics of policy_loss that add across micro-batches and ranks (the others are token means)
ADDITIVE = (schema.ADV_C_POS_TOKEN_SUM, schema.ADV_C_NEG_TOKEN_SUM, schema.ADV_C_POS_TOKEN_COUNT,
            schema.ADV_C_NEG_TOKEN_COUNT, schema.VALID_TOKENS)


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor | None = None,
                     log_ratio_clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """ratio = exp(clamp(logp - old_logp, -c, c)), 1 where `mask` is False; in the promoted
    float dtype (float32, or float64 for float64 input). old_logp is detached."""
    wd = torch.promote_types(logp.dtype, torch.float32)
    log_ratio = logp.to(wd) - old_logp.detach().to(wd)  # (B, T)
    if mask is not None:
        log_ratio = torch.where(mask, log_ratio, torch.zeros((), dtype=wd, device=logp.device))
    return log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp).exp()


def clip_sides(ratio: Tensor, adv: Tensor, eps_low: float | Tensor, eps_high: float | Tensor
               ) -> tuple[Tensor, Tensor]:
    """(clipped low, clipped high) bool: A < 0 and ratio < 1 - eps_low (the clip binds on the
    left); A > 0 and ratio > 1 + eps_high (on the right)."""
    return (adv < 0) & (ratio < 1 - eps_low), (adv > 0) & (ratio > 1 + eps_high)


def advantage_signs(adv: Tensor, mask: Tensor, tol: float = ADV_SIGN_TOL) -> tuple[Tensor, Tensor]:
    """(positive, negative) bool masks of the valid tokens with `adv > tol` / `adv < -tol`.

    Tokens with |adv| <= tol count on neither side (their sums are below tol per token).
    """
    return mask & (adv > tol), mask & (adv < -tol)


def adaptive_clip_bounds(
    h: Tensor, eps_low: float | Tensor, eps_high: float | Tensor, alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Component D: entropy-conditioned asymmetric clip bounds.

    eps_low(t) = eps_low * (1 - alpha h_t) where h_t <= 0 (up to 2 eps_low at h = -1), else eps_low;
    eps_high(t) = eps_high * (1 + alpha h_t) where h_t > 0 (up to 2 eps_high at h = 1), else eps_high.
    h (B, T) -> (eps_low (B, T), eps_high (B, T)) in h's float dtype.
    """
    lo = torch.as_tensor(eps_low, dtype=h.dtype, device=h.device).expand_as(h)
    hi = torch.as_tensor(eps_high, dtype=h.dtype, device=h.device).expand_as(h)
    low = torch.where(h <= 0, lo * (1 - alpha * h), lo)
    high = torch.where(h > 0, hi * (1 + alpha * h), hi)
    return low, high


def redistribute_advantages(
    adv: Tensor, h: Tensor, ratio: Tensor, eps_low: float | Tensor, eps_high: float | Tensor,
    beta: float = 1.0,
) -> Tensor:
    """Component C: A' = A (1 + beta h) for high-entropy tokens (h > 0) whose ratio is outside
    the neutral zone (1 - eps_low/2, 1 + eps_high/2), and for low-entropy tokens (h <= 0)
    whose ratio is inside it; every other token keeps A.

    The zone uses each token's own bounds (pass D's bounds when D is on). ratio is detached:
    C picks the advantage, it is not differentiated through. All (B, T); eps float or (B, T).
    """
    r = ratio.detach()
    inside = (r > 1 - eps_low / 2) & (r < 1 + eps_high / 2)  # (B, T)
    scaled = adv * (1 + beta * h)  # (B, T)
    return torch.where(h > 0, torch.where(inside, adv, scaled), torch.where(inside, scaled, adv))


def forking_token_mask(
    entropy: Tensor, mask: Tensor, quantile: float = 0.2, threshold: float | Tensor | None = None
) -> Tensor:
    """Mask of the "forking" tokens: the top-`quantile` entropy fraction of the valid tokens
    of the batch (entropy >= the (1 - quantile) linear-interpolation quantile), arXiv 2506.01939
    Eq. 5's indicator I[H_t >= tau_rho^B]. `threshold` overrides the local quantile (the learner
    passes the quantile over all ranks' tokens: the batch B of that paper is the global one).

    For the DAPO-with-forking-tokens baseline: multiply the loss mask by this. (B, T) -> (B, T)
    bool; all False when no token is valid.
    """
    if entropy.shape != mask.shape:
        raise ValueError(f"forking_token_mask: entropy {tuple(entropy.shape)} != mask {tuple(mask.shape)}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"forking_token_mask: quantile={quantile} must be in (0, 1]")
    mask = mask.bool()
    valid = entropy.detach()[mask].double()
    if valid.numel() == 0:
        return torch.zeros_like(mask)
    if threshold is None:
        threshold = quantile_1d(valid, 1.0 - quantile, "paper")
    return mask & (entropy.double() >= threshold)


def tis_weights(old_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights w = min(exp(old_logp - behaviour_logp), cap).

    Corrects for the sampler (behaviour) and learner (old) log-probs differing. Detached.
    """
    if cap <= 0:
        raise ValueError(f"tis_weights: cap={cap} must be > 0")
    log_w = (old_logp - behaviour_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_w.exp().clamp(max=cap)


def _frac(x: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    return (x & mask).sum().float() / n


def ratio_metrics(loss: Tensor, ratio: Tensor, a: Tensor, mask: Tensor, low: Tensor,
                  high: Tensor) -> dict[str, Tensor]:
    """The loss metrics every objective reports (detached 0-dim tensors): the loss, clipped
    fractions per side (`low`/`high`: (B, T) bool, tokens whose clip changed the gradient), the
    ratio's mean and mean |ratio - 1|, the advantage mass the loss saw by sign, valid tokens."""
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    n_valid = mask.sum()
    n = n_valid.clamp_min(1).float()
    pos, neg = advantage_signs(a, mask)
    return {
        schema.PG_LOSS: loss.detach(),
        schema.CLIP_FRAC_LOW: _frac(low, mask, n),
        schema.CLIP_FRAC_HIGH: _frac(high, mask, n),
        schema.RATIO_DEV_MEAN: torch.where(mask, (ratio - 1).abs(), zero).sum() / n,
        schema.RATIO_MEAN: torch.where(mask, ratio, zero).sum() / n,
        schema.ADV_C_POS_TOKEN_SUM: torch.where(pos, a, zero).sum(),
        schema.ADV_C_NEG_TOKEN_SUM: torch.where(neg, a, zero).sum(),
        schema.ADV_C_POS_TOKEN_COUNT: pos.sum().float(),
        schema.ADV_C_NEG_TOKEN_COUNT: neg.sum().float(),
        schema.VALID_TOKENS: n_valid.float(),
    }


def aggregate(per_token: Tensor, mask: Tensor, agg: str = "token-mean",
              normalizer: float | Tensor | None = None) -> Tensor:
    """Aggregate a (B, T) per-token loss to a 0-dim loss (every objective's last step):

      token-mean:          sum_t L_t / normalizer          (default: local valid tokens)
      seq-mean-token-mean: sum_i mean_t L_it / normalizer  (default: local non-empty rows)
      seq-mean-token-sum:  sum_i sum_t L_it / normalizer   (default: local non-empty rows)
    Pass `normalizer` = the global count (valid tokens, or sequences, of the whole mini-batch
    over gradient-accumulation steps and ranks) to make the mean global. Values under
    mask = 0 never count.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"aggregate: agg={agg!r} is not one of: {', '.join(AGGREGATIONS)}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    x = torch.where(mask, per_token, zero)  # (B, T)
    lengths = mask.sum(dim=1)  # (B,)
    if agg == "token-mean":
        total, default = x.sum(), mask.sum()
    else:
        seq = x.sum(dim=1)  # (B,)
        if agg == "seq-mean-token-mean":
            seq = seq / lengths.clamp_min(1)
        total, default = seq.sum(), (lengths > 0).sum()
    norm = default.clamp_min(1).to(x.dtype) if normalizer is None else normalizer
    return total / norm


def policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
    eps_low: float | Tensor, eps_high: float | Tensor, clip_c: float = 10.0,
    agg: str = "token-mean", *, normalizer: float | Tensor | None = None,
    h: Tensor | None = None, adv_before: Tensor | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with dual clip, no KL, no entropy bonus.

        ratio = exp(clamp(logp - old_logp, -20, 20))
        L_t = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        L_t = min(L_t, -A c)                        where A < 0 (dual clip)

    logp (B, T) with grad, old_logp (B, T), adv (B, T) (after C if on), mask (B, T) bool,
    eps float or (B, T) (D's bounds). Aggregation `agg`:
      token-mean:          sum_t L_t / normalizer   (default: local valid tokens)
      seq-mean-token-mean: sum_i mean_t L_it / normalizer   (default: local non-empty rows)
      seq-mean-token-sum:  sum_i sum_t L_it / normalizer    (default: local non-empty rows)
    Pass `normalizer` = the global count (valid tokens, or sequences, of the whole mini-batch
    over gradient-accumulation steps and ranks) to make the mean global.
    `h` adds the entropy split of the clip fractions; `adv_before` (adv before C) adds
    c_amplified_frac / c_damped_frac. Values under mask = 0 never affect loss or gradients.
    Returns (loss 0-dim, metrics of detached 0-dim tensors; see module docstring).
    """
    if not (logp.shape == old_logp.shape == adv.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(
            f"policy_loss: logp, old_logp, adv, mask must all be (B, T); got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(adv.shape)}, {tuple(mask.shape)}"
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"policy_loss: agg={agg!r} is not one of: {', '.join(AGGREGATIONS)}")
    if clip_c <= 1.0:
        raise ValueError(f"policy_loss: clip_c={clip_c} must be > 1")
    mask = mask.bool()
    wd = torch.promote_types(logp.dtype, torch.float32)  # float32, or float64 for float64 input
    zero = torch.zeros((), dtype=wd, device=logp.device)
    ratio = importance_ratio(logp, old_logp, mask, log_ratio_clamp)  # (B, T)
    a = torch.where(mask, adv.detach().to(wd), zero)  # (B, T)
    low, high = 1 - eps_low, 1 + eps_high
    low_t = torch.as_tensor(low, dtype=wd, device=ratio.device)
    high_t = torch.as_tensor(high, dtype=wd, device=ratio.device)
    clipped = torch.minimum(torch.maximum(ratio, low_t), high_t)  # (B, T)
    per_token = torch.maximum(-a * ratio, -a * clipped)  # (B, T)
    dual = torch.minimum(per_token, -a * clip_c)  # (B, T)
    per_token = torch.where(a < 0, dual, per_token)
    loss = aggregate(per_token, mask, agg, normalizer)

    with torch.no_grad():
        n = mask.sum().clamp_min(1).float()
        clip_low, clip_high = clip_sides(ratio, a, eps_low, eps_high)
        metrics = ratio_metrics(loss, ratio, a, mask, clip_low, clip_high)
        metrics[schema.DUAL_CLIP_FRAC] = _frac((a < 0) & (ratio > clip_c), mask, n)
        if h is not None:
            hi_ent = h > 0
            metrics[schema.CLIP_FRAC_LOW_HI_ENT] = _frac(clip_low & hi_ent, mask, n)
            metrics[schema.CLIP_FRAC_LOW_LO_ENT] = _frac(clip_low & ~hi_ent, mask, n)
            metrics[schema.CLIP_FRAC_HIGH_HI_ENT] = _frac(clip_high & hi_ent, mask, n)
            metrics[schema.CLIP_FRAC_HIGH_LO_ENT] = _frac(clip_high & ~hi_ent, mask, n)
        if adv_before is not None:
            before = adv_before.detach().to(wd).abs()
            metrics[schema.C_AMPLIFIED_FRAC] = _frac(a.abs() > before, mask, n)
            metrics[schema.C_DAMPED_FRAC] = _frac(a.abs() < before, mask, n)
    return loss, metrics
