"""Rollout engines: the `RolloutEngine` protocol, the HF engine (the learner's own model, a KV-cache
decode loop) and the vLLM engine (colocated `vllm.LLM`, imported lazily), plus component A's
adaptive-temperature processors for both. Importing this package never imports vllm."""

from .base import (
    RolloutBatch,
    RolloutEngine,
    SamplingSpec,
    clean_param_name,
    recompute_adaptive_temperature,
)
from .factory import build_engine
from .hf import HFEngine
from .processors import AdaptiveTemperatureLogitsProcessor

__all__ = [
    "AdaptiveTemperatureLogitsProcessor",
    "HFEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingSpec",
    "build_engine",
    "clean_param_name",
    "recompute_adaptive_temperature",
]
