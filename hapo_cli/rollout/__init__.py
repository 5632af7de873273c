"""Rollout engines: the `RolloutEngine` protocol, the HF engine (the learner's own model, a KV-cache
decode loop) and the vLLM engine (colocated `vllm.LLM`, imported lazily), plus component A's
adaptive-temperature processors for both. Importing this package never imports vllm, nor the
engine factory (`rollout.factory.build_engine`), which imports the server and vLLM engines."""

from .base import (
    RolloutBatch,
    RolloutEngine,
    SamplingSpec,
    clean_param_name,
    recompute_adaptive_temperature,
)
from .hf import HFEngine
from .processors import AdaptiveTemperatureLogitsProcessor

__all__ = [
    "AdaptiveTemperatureLogitsProcessor",
    "HFEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingSpec",
    "clean_param_name",
    "recompute_adaptive_temperature",
]
