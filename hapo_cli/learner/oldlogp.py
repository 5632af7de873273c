"""When the rollout's behaviour log-probs ARE the old log-probs, so the no-grad scoring pass can go.

Old log-probs are those of the policy that sampled, at the temperature the loss uses. The HF
engine records, per token, `log_softmax(logits / T_t)[y]` before any top-k/top-p truncation and the
untempered entropy, computed from the learner's own module at sampling time (`rollout/base.py`).
Scoring recomputes exactly these quantities from the same weights. They are the same numbers,
up to float32 rounding of two evaluation orders (the decode's KV-cache steps vs one full-sequence
forward; tests/test_oldlogp.py measures the gap), when all of these hold:

- the engine sampled with the learner's module itself (HF engine, not sharded: no FSDP2 engine
  copy, no ZeRO-3 partitions) and no weight changed since: true at scoring time, which runs
  before the step's first optimizer step, so it holds for every mini-batch of the step;
- both sides compute in float32 (under bf16 autocast the engine decodes under the learner's
  autocast too, but a KV-cache step and a full-sequence forward round bf16 differently: far more
  than float32 rounding, so the batch is rescored);
- the learner's temperature equals the sampling temperature on every valid token: always with
  `algo.policy_temperature: rollout` (the learner divides by the stored T_t); with `base` where
  T_t == T, i.e. without A (or A's first step, before any entropy stats exist). Under A with
  `base` the HF engine also records `base_logp`, the log-prob at the base T of each sampled
  token (one more log-softmax per decode step), which is then the old log-prob;
- the engine recorded decode-time stats (vLLM does not, and its log-probs follow its own
  truncation and kernels: always recompute).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .forward import unwrap


def old_logp_source(
    *,
    same_module: bool,
    float32: bool,
    decode_stats: bool,
    policy_temperature: str,
    base_temperature: float,
    temperature: Tensor,  # (B, T) T_t used when sampling
    mask: Tensor,  # (B, T) bool valid response tokens
    has_base_logp: bool = False,
) -> str | None:
    """Which rollout tensor equals the old log-probs scoring would give: "behaviour"
    (`behaviour_logp`, at T_t), "base" (`base_logp`, the engine's log-prob at the base T) or
    None (score the batch). See the module docstring for each condition."""
    if not (same_module and float32 and decode_stats):
        return None
    if policy_temperature == "rollout":
        return "behaviour"
    # `base`: the learner scores at the plain T; exact float32 equality with the stored T_t
    if bool((temperature[mask] == torch.tensor(base_temperature, dtype=temperature.dtype)).all()):
        return "behaviour"
    return "base" if has_base_logp else None


def reuse_behaviour_logp(recipe: Any, strategy: Any, engine: Any, batch: Any) -> tuple[Tensor, Tensor] | None:
    """(old_logp, entropy) (B, T) of `batch` taken from the rollout when they are the old
    policy's (0 on padding), else None: the learner must score the batch itself."""
    same = (engine.samples_with_learner_module and not strategy.sharded
            and strategy.model is not None
            and unwrap(engine.model) is unwrap(strategy.model)
            and strategy.engine_model() is unwrap(strategy.model))
    source = old_logp_source(
        same_module=same,
        float32=strategy.precision.compute == torch.float32,
        decode_stats=bool(batch.decode_stats),
        policy_temperature=recipe.algo.policy_temperature,
        base_temperature=recipe.rollout.temperature,
        temperature=batch.temperature,
        mask=batch.mask,
        has_base_logp=getattr(batch, "base_logp", None) is not None,
    )
    if source is None:
        return None
    logp = batch.behaviour_logp if source == "behaviour" else batch.base_logp
    zero = torch.zeros_like(batch.behaviour_logp)
    old_logp = torch.where(batch.mask, logp.float(), zero)
    entropy = torch.where(batch.mask, batch.rollout_entropy.float(), zero)
    return old_logp, entropy


__all__ = ["old_logp_source", "reuse_behaviour_logp"]
