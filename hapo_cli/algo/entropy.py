"""Token entropy, the batch entropy stats and the normalised entropy `h` (components A, C, D).

Paper math (docs/concepts.md, "The paper's equations"), over the valid tokens of a batch with
per-token entropy `H` (nats):

    x = log(max(H, eps))
    rho = quantile(x, pivot)                      # pivot q = 0.8 by default
    sigma = sqrt(mean((x - rho)^2))               # RMS around the pivot, not around the mean
    z = (x - rho) / sigma
    h = z / scale_pos  where z > 0                # scale_pos = max(z+)   -> h in (0, 1]
    h = z / scale_neg  where z <= 0               # scale_neg = |min(z-)| -> h in [-1, 0]

`mode="released"` reproduces the authors' released code (`compute_entropy_h` in their
`verl/trainer/ppo/core_algos.py`): the pivot is the nearest-rank quantile (index
`round(q * (n - 1))`, Python's round-half-to-even), the variance is clamped to `eps`, and the
negative side is divided by `min(z) < 0` (their `scale_neg = 1 / neg_min`), so low-entropy tokens
get `h >= 0` too. Storing the *divisor* `scale_neg` with its sign lets one formula serve both
modes. At decode time the released code uses `eps = 1e-6` for both the log clamp and
`std + eps` (their `compute_entropy_based_temperature`); `adaptive_temperature` reproduces that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

NormMode = Literal["paper", "released"]
_MODES = ("paper", "released")
# The released code's decode-time epsilon (log clamp and `std + eps`), see module docstring.
RELEASED_DECODE_EPS = 1e-6


@dataclass(frozen=True)
class EntropyStats:
    """The four numbers that map an entropy to `h`, plus the mode that produced them.

    `h = ((log max(H, eps) - rho) / std) / scale` with `scale = scale_pos` where that z is > 0
    and `scale = scale_neg` where it is <= 0. Paper mode: `scale_neg > 0`. Released mode:
    `scale_neg < 0` (the released code's sign). `num_tokens` is how many valid tokens produced
    them (0: degenerate stats, see `entropy_stats`).
    """

    rho: float
    std: float
    scale_pos: float
    scale_neg: float
    mode: NormMode = "paper"
    eps: float = 1e-8
    num_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"EntropyStats.mode={self.mode!r} is not one of: {', '.join(_MODES)}")
        for name in ("rho", "std", "scale_pos", "scale_neg", "eps"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"EntropyStats.{name}={value!r} must be finite")
        if self.std <= 0 or self.scale_pos <= 0 or self.scale_neg == 0:
            raise ValueError(
                f"EntropyStats needs std > 0, scale_pos > 0, scale_neg != 0; got std={self.std}, "
                f"scale_pos={self.scale_pos}, scale_neg={self.scale_neg}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (floats, str, int) for checkpoints and `SamplingParams.extra_args`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntropyStats:
        """Inverse of `to_dict`; unknown keys are an error, `eps`/`num_tokens` may be absent."""
        known = {"rho", "std", "scale_pos", "scale_neg", "mode", "eps", "num_tokens"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"EntropyStats.from_dict: unknown keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {
            k: float(data[k]) for k in ("rho", "std", "scale_pos", "scale_neg") if k in data
        }
        missing = {"rho", "std", "scale_pos", "scale_neg"} - set(kwargs)
        if missing:
            raise ValueError(f"EntropyStats.from_dict: missing keys {sorted(missing)}")
        kwargs["mode"] = data.get("mode", "paper")
        if "eps" in data:
            kwargs["eps"] = float(data["eps"])
        if "num_tokens" in data:
            kwargs["num_tokens"] = int(data["num_tokens"])
        return cls(**kwargs)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last dim: `H = -sum_v p_v log p_v`.

    (..., V) -> (...), float32 (float64 for float64 input); bf16/fp16 input is upcast.
    `-inf` logits are allowed (p = 0 contributes 0, guarded by `where(p > 0, p*logp, 0)`).
    This upcasts all of `logits` at once; for [B, T, V] learner tensors use
    `logprobs_and_entropy`, which works in chunks.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"token_entropy: logits must have a non-empty last dim, got {tuple(logits.shape)}")
    work = logits.double() if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(work, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def _check_mode_pivot(mode: str, pivot: float) -> None:
    if mode not in _MODES:
        raise ValueError(f"entropy normalisation mode={mode!r} is not one of: {', '.join(_MODES)}")
    if not 0.0 <= float(pivot) <= 1.0:
        raise ValueError(f"entropy pivot={pivot!r} must be in [0, 1]")


def valid_log_entropy(entropy: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """`x = log(max(H, eps))` of the valid tokens, flattened, float64. (B, T) -> (n,)."""
    if entropy.shape != mask.shape:
        raise ValueError(
            f"entropy and mask must have the same shape, got {tuple(entropy.shape)} and {tuple(mask.shape)}"
        )
    valid = entropy.detach()[mask.bool()].double()
    return valid.clamp_min(eps).log()


def quantile_1d(x: Tensor, q: float, mode: NormMode) -> float:
    """Quantile of a 1-D tensor (any order): linear interpolation between order statistics
    (torch.quantile semantics) in paper mode, nearest rank `x_(round(q (n-1)))` (Python
    rounding, as the released code) in released mode. O(n) via kthvalue, no full sort, and no
    torch.quantile input-size limit. Empty -> 0.0."""
    n = x.numel()
    if n == 0:
        return 0.0
    pos = float(q) * (n - 1)

    def order_stat(k: int) -> float:  # k-th smallest, 0-based
        return float(x.kthvalue(k + 1).values)

    if mode == "released":
        return order_stat(round(pos))
    lo = math.floor(pos)
    a = order_stat(lo)
    if pos == lo:
        return a
    b = order_stat(min(lo + 1, n - 1))
    return a + (b - a) * (pos - lo)


def _quantile_tensor(x: Tensor, q: float, mode: NormMode) -> Tensor:
    """`quantile_1d` of a non-empty float64 x as a 0-dim tensor (no host sync): the same float64
    operations, so `float()` of it equals `quantile_1d(x, q, mode)` exactly."""
    n = x.numel()
    pos = float(q) * (n - 1)
    if mode == "released":
        return x.kthvalue(round(pos) + 1).values
    lo = math.floor(pos)
    a = x.kthvalue(lo + 1).values
    if pos == lo:
        return a
    b = x.kthvalue(min(lo + 1, n - 1) + 1).values
    return a + (b - a) * (pos - lo)


def stats_from_reduced(
    count: int, rho: float, sq_dev_sum: float, x_min: float, x_max: float,
    mode: NormMode = "paper", eps: float = 1e-8,
) -> EntropyStats:
    """EntropyStats from already-reduced numbers (so the distributed path shares this code).

    `count` valid tokens, pivot `rho`, `sq_dev_sum = sum((x - rho)^2)`, `x_min/x_max` the
    extreme log-entropies. `max(z+) = (x_max - rho)/sigma` and `min(z-) = (x_min - rho)/sigma`
    because z is monotone in x.

    Degenerate cases (never NaN):
      - no valid tokens: paper -> (rho 0, std 1, scale_pos 1, scale_neg 1), so h = clamp(log H);
        released -> what the released code yields: (0, sqrt(eps), eps, -eps).
      - all entropies equal (sigma = 0): std = sqrt(eps) in released mode (its var clamp),
        max(sigma, eps) in paper mode; every batch token then has z = 0, h = 0.
      - no z > 0 (or no z < 0): paper mode uses scale 1 for that side (h = clamp(z)); released
        mode uses eps (resp. -eps), as its `clamp_min(eps)`, so any such z maps to +-1.
    """
    if count <= 0:
        if mode == "paper":
            return EntropyStats(0.0, 1.0, 1.0, 1.0, mode, eps, 0)
        return EntropyStats(0.0, math.sqrt(eps), eps, -eps, mode, eps, 0)
    var = sq_dev_sum / count
    if mode == "released":
        std = math.sqrt(max(var, eps))
        z_max, z_min = (x_max - rho) / std, (x_min - rho) / std
        scale_pos = max(z_max, eps) if z_max > 0 else eps
        scale_neg = min(z_min, -eps) if z_min < 0 else -eps
    else:
        std = max(math.sqrt(var), eps)
        z_max, z_min = (x_max - rho) / std, (x_min - rho) / std
        scale_pos = z_max if z_max > 0 else 1.0
        scale_neg = -z_min if z_min < 0 else 1.0
    return EntropyStats(float(rho), float(std), float(scale_pos), float(scale_neg), mode, eps, int(count))


def entropy_stats(
    entropy: Tensor, mask: Tensor, pivot: float = 0.8, mode: NormMode = "paper", eps: float = 1e-8,
) -> EntropyStats:
    """Batch entropy stats (rho, sigma, scale_pos, scale_neg) over the valid tokens.

    entropy (B, T) nats of the untempered distribution, mask (B, T) bool. Computed in float64.
    Paper: rho = quantile_linear(x, pivot), sigma = sqrt(mean((x - rho)^2)),
    scale_pos = max(z+), scale_neg = |min(z-)|. Released: nearest-rank quantile, var clamped
    to eps, scale_neg = min(z) < 0. See `stats_from_reduced` for degenerate batches.
    """
    _check_mode_pivot(mode, pivot)
    x = valid_log_entropy(entropy, mask, eps)  # (n,)
    n = x.numel()
    if n == 0:
        return stats_from_reduced(0, 0.0, 0.0, 0.0, 0.0, mode, eps)
    rho = _quantile_tensor(x, pivot, mode)  # float64 throughout, read once below
    sq_dev_sum = ((x - rho) ** 2).sum()
    rho, sq_dev_sum, x_min, x_max = torch.stack([rho, sq_dev_sum, x.min(), x.max()]).tolist()
    return stats_from_reduced(n, rho, sq_dev_sum, x_min, x_max, mode, eps)


def _h_from_z(z: Tensor, stats: EntropyStats) -> Tensor:
    h = torch.where(z > 0, z / stats.scale_pos, z / stats.scale_neg)
    return h.clamp(-1.0, 1.0)


def normalized_entropy(entropy: Tensor, stats: EntropyStats) -> Tensor:
    """h in [-1, 1] for each entropy (any shape, nats): z = (log max(H, eps) - rho)/std,
    h = clamp(z / scale_pos if z > 0 else z / scale_neg, -1, 1).

    On the batch the stats came from, h is already in [-1, 1] (paper) / [0, 1] (released);
    the clamp matters for new entropies (decode time, later micro-batches). Padding positions
    get a finite h that callers must mask. float32 (float64 for float64 input).

    z is computed in float64, as the stats are (`valid_log_entropy`): the batch's extreme
    tokens then get exactly h = -1 / +1 (z / scale is x / x), whatever the input's float noise.
    In float32 the lowest-entropy token got -0.99999988 or -1.0 depending on padding width,
    so C's `1 + beta h` was 1e-7 or 0 and sign-based counts differed between equal runs.
    """
    out_dtype = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    z = (entropy.double().clamp_min(stats.eps).log() - stats.rho) / stats.std
    return _h_from_z(z, stats).to(out_dtype)


def adaptive_temperature(
    logits: Tensor, base_temperature: float | Tensor, tau: float, stats: EntropyStats | None,
    entropy: Tensor | None = None,
) -> Tensor:
    """Component A: per-row temperature T_t = T * (1 + tau * clamp(h_t, -1, 1)).

    logits (N, V) untempered; h_t from the entropy of softmax(logits_t) and the previous
    step's stats. stats None -> plain T (the first step). base_temperature: float or (N,).
    Released mode reproduces the released decode path: log clamp and `std + eps` with
    eps = 1e-6. `entropy` (N,): `token_entropy(logits)` when the caller has it already (a
    decode loop that records it), so it is not computed twice. Returns (N,) float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"adaptive_temperature: logits must be (N, V), got {tuple(logits.shape)}")
    n = logits.shape[0]
    base = torch.as_tensor(base_temperature, dtype=torch.float32, device=logits.device)
    if base.dim() > 1 or (base.dim() == 1 and base.shape[0] != n):
        raise ValueError(f"adaptive_temperature: base_temperature must be a float or ({n},), got {tuple(base.shape)}")
    base = base.expand(n)
    if stats is None or tau == 0:
        return base.clone()
    return temperature_from_entropy(token_entropy(logits) if entropy is None else entropy,
                                    base, tau, stats)


def temperature_from_entropy(
    entropy: Tensor, base_temperature: float | Tensor, tau: float, stats: EntropyStats | None,
) -> Tensor:
    """Component A's map, T_t = T * (1 + tau * clamp(h_t, -1, 1)), from entropies of any shape
    (nats): the one place it is written. `adaptive_temperature` calls it on the decode-time
    logits; the learner calls it on its own entropies for engines that cannot record T_t at
    decode time (vLLM). Released mode: the released decode path's log clamp and `std + eps`
    (eps = 1e-6). stats None or tau 0 -> plain T. base_temperature: float or entropy's shape.
    Returns float32, entropy's shape.
    """
    ent = entropy.float()
    base = torch.as_tensor(base_temperature, dtype=torch.float32, device=ent.device)
    base = base.expand_as(ent)
    if stats is None or tau == 0:
        return base.clone()
    if stats.mode == "released":
        e = RELEASED_DECODE_EPS
        z = (ent.clamp_min(e).log() - stats.rho) / (stats.std + e)
        h = _h_from_z(z, stats)
    else:
        h = normalized_entropy(ent, stats)
    return base * (1.0 + tau * h.clamp(-1.0, 1.0))


def apply_adaptive_temperature(
    logits: Tensor, base_temperature: float | Tensor, tau: float, stats: EntropyStats | None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Divide each row of logits (N, V) by its adaptive temperature (base T included).

    The one function both the transformers LogitsProcessor and the vLLM plugin call, so the
    two agree on the same logits. Returns (scaled_logits (N, V) in logits' dtype, temps (N,)
    float32). Callers must not apply the base temperature a second time.
    """
    temps = adaptive_temperature(logits, base_temperature, tau, stats, entropy)  # (N,)
    scaled = (logits.float() / temps.unsqueeze(-1)).to(logits.dtype)
    return scaled, temps
