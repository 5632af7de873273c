"""The engine factory: `rollout.engine` -> an engine object. It lives apart from the contract
(`base.py`), which the engines import, so that no module imports its own importer."""

from __future__ import annotations

from typing import Any

import torch

from ..recipe import RolloutConfig
from .base import RolloutEngine

# `rollout.engine` -> whether the engine samples with the learner's own module. Such an engine
# needs full parameters on each rank (under FSDP2 and ZeRO-3 it gets an unsharded copy) and
# takes new weights by reference; the others load them (`sync_weights`).
ENGINES: dict[str, bool] = {"hf": True, "vllm": False, "vllm-server": False}


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINES)


def samples_with_learner_module(name: str) -> bool:
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r} is not one of: {', '.join(ENGINES)}")
    return ENGINES[name]


def build_engine(
    rollout_cfg: RolloutConfig,
    model: torch.nn.Module | None,
    tokenizer: Any,
    model_path: str | None,
    accelerator: Any = None,
    *,
    max_prompt_length: int | None = None,
    max_new_tokens: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    run_dir: Any = None,
) -> RolloutEngine:
    """The engine named by `rollout_cfg.engine`.

    hf: samples with the learner's own model object (unwrapped through `accelerator`).
    vllm: a colocated `vllm.LLM` loaded from `model_path` (a saved HF directory); its
    `max_model_len` is `rollout.vllm.max_model_len` or `max_prompt_length + max_new_tokens`
    (`max_new_tokens` defaults to `rollout.max_new_tokens`); `trust_remote_code` as the
    learner loaded the model (`model.trust_remote_code`).
    vllm-server: the servers of `rollout.server.urls`, or local servers started from
    `model_path` (logs and process ids in `run_dir`); `model`'s config is checked against theirs.
    """
    if rollout_cfg.engine == "hf":
        from .hf import HFEngine

        if model is None:
            raise ValueError("build_engine: rollout.engine='hf' needs the learner's model")
        return HFEngine(
            model, tokenizer, batch_size=rollout_cfg.batch_size, accelerator=accelerator
        )
    if rollout_cfg.engine == "vllm":
        from .vllm import VLLMEngine

        if not model_path:
            raise ValueError("build_engine: rollout.engine='vllm' needs a saved model directory")
        max_len = rollout_cfg.vllm.max_model_len
        if max_len is None and max_prompt_length is not None:
            max_len = max_prompt_length + (max_new_tokens or rollout_cfg.max_new_tokens)
        return VLLMEngine(
            model_path,
            rollout_cfg.vllm,
            tokenizer=tokenizer,
            max_model_len=max_len,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
    if rollout_cfg.engine == "vllm-server":
        from .server_local import build_server_engine

        max_len = rollout_cfg.vllm.max_model_len
        if max_len is None and max_prompt_length is not None:
            max_len = max_prompt_length + (max_new_tokens or rollout_cfg.max_new_tokens)
        return build_server_engine(rollout_cfg, model, tokenizer, model_path, accelerator,
                                   run_dir=run_dir, max_model_len=max_len, dtype=dtype, seed=seed)
    raise ValueError(f"rollout.engine={rollout_cfg.engine!r} is not one of: {', '.join(ENGINES)}")
