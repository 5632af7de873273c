"""The paper's math as pure torch functions: no I/O, no global state; imports only torch
and the run-directory names (`analysis.schema`, standard library only).

Glossary (used in every shape comment):
    B  responses in a batch = prompts x G
    G  group size (responses sampled per prompt)
    T  response tokens (padded length); `mask` (B, T) bool, True = a real token
    V  vocabulary size
    N  flattened tokens (rows of a logits matrix)
    h  normalised entropy in [-1, 1]; `scores` one reward per response; `adv` advantages

Components: A adaptive temperature (entropy.py), B token-level group advantages
(advantages.py), C advantage redistribution and D adaptive clipping (loss.py). The
baselines' other objectives (GSPO, CISPO) and the KL penalty: objectives.py.
"""

from .advantages import grpo_advantages, token_level_group_advantages
from .distributed import distributed_entropy_stats, stats_from_shards
from .entropy import (
    EntropyStats,
    adaptive_temperature,
    apply_adaptive_temperature,
    entropy_stats,
    normalized_entropy,
    quantile_1d,
    token_entropy,
)
from .fused import fused_logprobs_and_entropy
from .logprobs import logprobs_and_entropy
from .loss import (
    ADV_SIGN_TOL,
    adaptive_clip_bounds,
    advantage_signs,
    aggregate,
    clip_sides,
    forking_token_mask,
    importance_ratio,
    policy_loss,
    redistribute_advantages,
    tis_weights,
)
from .objectives import KL_ESTIMATORS, cispo_policy_loss, gspo_policy_loss, kl_penalty

__all__ = [
    "ADV_SIGN_TOL",
    "KL_ESTIMATORS",
    "aggregate",
    "cispo_policy_loss",
    "gspo_policy_loss",
    "kl_penalty",
    "clip_sides",
    "importance_ratio",
    "EntropyStats",
    "adaptive_clip_bounds",
    "adaptive_temperature",
    "advantage_signs",
    "apply_adaptive_temperature",
    "distributed_entropy_stats",
    "entropy_stats",
    "forking_token_mask",
    "fused_logprobs_and_entropy",
    "grpo_advantages",
    "logprobs_and_entropy",
    "normalized_entropy",
    "policy_loss",
    "quantile_1d",
    "redistribute_advantages",
    "stats_from_shards",
    "tis_weights",
    "token_entropy",
    "token_level_group_advantages",
]
