"""How the learner's model is distributed and in which precision it computes.

One object owns what differs between strategies, so the training loop reads the same for all:

| strategy  | set up by                                   | parameters per rank     |
| --------- | ------------------------------------------- | ----------------------- |
| single    | one process                                 | all, fp32               |
| ddp       | `accelerate launch` (ddp.yaml, --multi_gpu) | all, fp32               |
| fsdp2     | `accelerate launch` with fsdp.yaml          | 1/world (DTensor), fp32 |
| deepspeed | `accelerate launch` with zero2/zero3.yaml   | ZeRO-3: 1/world         |

Master weights and optimizer state are fp32 on every strategy. `model.dtype` (and/or
`train.mixed_precision`) set the *compute* dtype: autocast for single/DDP (accelerate's mixed
precision), `MixedPrecisionPolicy(param_dtype=...)` for FSDP2 (parameters all-gathered in the
compute dtype, gradients reduced in fp32), DeepSpeed's own bf16 mode (fp32 master copy in the
optimizer).

FSDP2 is applied with torch's `fully_shard` directly, the same on CPU (gloo) and GPU (NCCL):
accelerate 1.15 without CUDA turns an FSDP config into plain DDP (`Accelerator(cpu=True)`) or
into unconnected processes (`cpu=False`), so the learner builds a plain process group with
accelerate and shards the model itself. The `fsdp_config` keys of the accelerate config it
honours: `fsdp_version` (must be 2), `fsdp_reshard_after_forward`, `fsdp_offload_params`,
`fsdp_activation_checkpointing`.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from accelerate import Accelerator, PartialState
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers.integrations.deepspeed import deepspeed_config

from ..errors import HapoError
from ..lora import checkpoint_state
from ..rollout.factory import samples_with_learner_module
from ..sharded import full_named_parameters, sharding_of
from . import zero_checkpoint, zero_state
from .checkpoint import OPTIM_FILE
from .dcp_checkpoint import is_dcp, load_into_strategy
from .forward import unwrap
from .fsdp2 import apply_fsdp2
from .gloo_reduce import slice_deepspeed_reduce_scatter
from .precision import Precision, env_true
from .sharded_load import load_policy_sharded, load_policy_zero3
from .zero_memory import share_fp32_masters, zero_buckets

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from transformers import PreTrainedModel

    from ..sections import LoraConfig


def detect_kind(world_size: int) -> str:
    """The strategy `accelerate launch` asked for (its config travels in environment variables)."""
    if env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise HapoError(
                f"accelerate config fsdp_config.fsdp_version={version}: only FSDP2 is supported "
                "(set fsdp_version: 2, as recipes/accelerate/fsdp.yaml does)"
            )
        return "fsdp2"
    return "ddp" if world_size > 1 else "single"


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def build_accelerator(precision: Precision, **kwargs) -> tuple[Any, str]:
    """(Accelerator, strategy kind). Without CUDA the accelerator runs on the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = detect_kind(world)
    cpu = not torch.cuda.is_available()
    if kind == "fsdp2":
        if precision.compute == torch.float16:
            raise HapoError("FSDP2 with float16 compute needs a gradient scaler hapo does not "
                            "run; use model.dtype=bfloat16")
        # a plain process group from accelerate; `fully_shard` is applied in `prepare`
        with _env("ACCELERATE_USE_FSDP", "false"):
            acc = Accelerator(cpu=cpu, mixed_precision="no", **kwargs)
        return acc, kind
    if kind == "deepspeed":
        if cpu:
            # accelerate 1.15 without CUDA finds no backend for DeepSpeed and reports ONE
            # process on every rank (while DeepSpeed itself forms a 2-rank group): name gloo

            PartialState(backend="gloo")
        acc = Accelerator(mixed_precision=precision.mixed_precision, **kwargs)
        return acc, kind
    # without CUDA, `accelerate launch --multi_gpu -n 2` needs cpu=True to form a gloo group
    acc = Accelerator(cpu=cpu, mixed_precision=precision.mixed_precision, **kwargs)
    return acc, kind


def unsharded_copy(model: nn.Module, dtype: torch.dtype, accelerator) -> nn.Module:
    """A full copy of `model` in `dtype` on the accelerator's device, for the HF engine. Under
    ZeRO-3 transformers builds the model inside `deepspeed.zero.Init` (its parameters are empty
    partitions from the start), and under FSDP2's sharded start-up the model arrives already
    sharded (DTensors): the copy is then built empty from the config (a plain constructor,
    outside zero.Init) and filled from `full_named_parameters` (collective: every rank calls
    this); buffers are never partitioned and are copied as they are."""
    device = accelerator.device
    already_sharded = any(_is_dtensor(p) for p in model.parameters())  # sharded start-up
    if sharding_of(accelerator) != "zero3" and not already_sharded:
        return copy.deepcopy(model).to(dtype).to(device)
    with torch.device("meta"):  # `model` is a transformers model: built from its config
        fresh = cast("PreTrainedModel", type(model)(copy.deepcopy(model.config)))
    fresh.to_empty(device=device)
    fresh.tie_weights()  # the meta-device construction leaves lm_head untied
    mine = dict(fresh.named_parameters())
    differ = sorted(mine.keys() ^ {n for n, _ in model.named_parameters()})
    if differ:  # every entry of the copy must be written below
        raise RuntimeError(f"ZeRO-3 engine copy: parameter names differ: {differ}")
    with torch.no_grad():
        for name, full in full_named_parameters(model, accelerator):
            mine[name].copy_(full)
        for name, b in fresh.named_buffers():
            b.copy_(model.get_buffer(name))
    # nn.Module's `to`: transformers wraps it with functools.wraps, which pyright misreads
    return cast(nn.Module, fresh).to(dtype)


def _is_dtensor(p: Tensor) -> TypeGuard[DTensor]:
    return hasattr(p, "full_tensor") and hasattr(p, "to_local")


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage held by this rank (a DTensor's local shard only)."""
    total = 0
    for p in model.parameters():
        # FSDP2: the DTensor's local shard; ZeRO-3: the partition (`ds_tensor`), p is empty
        t = p.to_local() if _is_dtensor(p) else getattr(p, "ds_tensor", p)
        total += t.numel() * t.element_size()
    return total


class Strategy:
    """Prepares model and optimizer and runs the parts of an update that differ by strategy."""

    def __init__(self, kind: str, accelerator, precision: Precision):
        self.kind = kind
        self.accelerator = accelerator
        self.precision = precision
        self.world = accelerator.num_processes
        self.model: nn.Module | None = None  # set by `prepare` (wrapped by the strategy)
        self.optimizer: torch.optim.Optimizer | None = None  # set by `prepare`
        self._engine_model: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        """Whether a rank holds only part of the parameters (FSDP2, ZeRO-3)."""
        if self.kind == "fsdp2":
            return True
        if self.kind == "deepspeed":
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            return plugin is not None and getattr(plugin, "zero_stage", 0) == 3
        return False

    @contextmanager
    def loading(self):
        """Context for loading the whole policy (or a checkpoint) on every rank: what FSDP2
        falls back to when the sharded start-up (`load_policy`) cannot read the folder; each
        rank then loads the whole model itself: with accelerate's `fsdp_cpu_ram_efficient_loading`
        transformers (`is_fsdp_enabled`) leaves every rank but 0 with unloaded weights, for an
        FSDP1 broadcast (`sync_module_states`) that `fully_shard` does not do; under
        transformers 5.19 (what vLLM's CPU build pins) rank 1 then trained from uninitialised
        memory."""
        if self.kind == "fsdp2":
            with _env("FSDP_CPU_RAM_EFFICIENT_LOADING", "false"):
                yield
        else:
            yield

    def load_policy(self, path: Path, trust_remote_code: bool = False, *, lora: bool = False):
        """(model, tokenizer) of the policy folder `path` in the master dtype. FSDP2: a sharded
        start-up, each rank reading only its slices of the safetensors (`sharded_load.py`;
        the model comes back already under `fully_shard`, `prepare` keeps it), unless the
        folder's layout needs a full load or adapters (model.lora) are added first. ZeRO-3
        with zero3_init_flag: the same, each rank filling only its DeepSpeed partitions
        (`load_policy_zero3`). Others (and those fallbacks): every rank loads the whole model
        (ZeRO-3 with zero3_init: transformers' `from_pretrained` inside `deepspeed.zero.Init`)."""
        from ..model_dirs import load_policy

        if self.kind == "fsdp2" and not lora:
            got = load_policy_sharded(Path(path), self, trust_remote_code)
            if got is not None:
                return got
        if self.kind == "deepspeed" and self.sharded and not lora and deepspeed_config():
            got = load_policy_zero3(Path(path), self, trust_remote_code)
            if got is not None:
                return got
        with self.loading():
            return load_policy(path, self.load_dtype, trust_remote_code)

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype to load the policy in: the master dtype (fp32)."""
        return self.precision.master

    # ---- setup ----
    def prepare(self, model: nn.Module, make_optimizer, *, engine: str = "hf",
                micro_batch_size: int = 1, grad_clip: float = 1.0):
        """(model, optimizer) ready to train. `make_optimizer(params)` builds the torch optimizer
        on the parameters it must own (the fp32 shards under FSDP2). DeepSpeed needs the
        micro-batch size (no dataloader is prepared) and does the clipping itself."""
        if self.kind == "deepspeed":
            cfg = self.accelerator.state.deepspeed_plugin.deepspeed_config
            cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
            cfg["gradient_accumulation_steps"] = 1  # boundaries: `micro_batch` sets them
            cfg["train_batch_size"] = micro_batch_size * self.world
            cfg["gradient_clipping"] = grad_clip
            zero_buckets(cfg, model)
            slice_deepspeed_reduce_scatter()  # gloo: ZeRO-3's gradients in slices
        if self.sharded and samples_with_learner_module(engine):
            # the HF engine decodes token by token on each rank with different lengths, which a
            # sharded forward (FSDP2, ZeRO-3: a collective per layer) cannot: it samples from an
            # unsharded copy in the compute dtype, synced after each step (`HFEngine.sync_from`)
            self._engine_model = unsharded_copy(model, self.precision.compute, self.accelerator)
        if self.kind == "fsdp2" and not any(_is_dtensor(p) for p in model.parameters()):
            model = apply_fsdp2(
                model, self.precision, self.accelerator.device,
                reshard_after_forward=env_true("FSDP_RESHARD_AFTER_FORWARD", "true"),
                offload=env_true("FSDP_OFFLOAD_PARAMS"),
            )
        if self.kind == "fsdp2":
            if env_true("FSDP_ACTIVATION_CHECKPOINTING"):
                cast("PreTrainedModel", model).gradient_checkpointing_enable()
            optimizer = make_optimizer(model.parameters())
        else:
            optimizer = make_optimizer(model.parameters())
            model, optimizer = self.accelerator.prepare(model, optimizer)
            if self.kind == "deepspeed" and self.sharded:
                share_fp32_masters(optimizer)
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    @property
    def engine_copy(self) -> bool:
        """Whether the HF engine samples from an unsharded copy rather than the learner's module."""
        return self._engine_model is not None

    def engine_model(self) -> nn.Module:
        """The module the HF rollout engine samples from."""
        if self._engine_model is not None:
            return self._engine_model
        return unwrap(self._prepared()[0])

    def _prepared(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(model, optimizer) of `prepare`."""
        assert self.model is not None and self.optimizer is not None, "call prepare first"
        return self.model, self.optimizer

    # ---- one update ----
    @contextmanager
    def micro_batch(self, index: int, count: int):
        """Context of micro-batch `index` of `count` in one mini-batch: gradients are reduced
        across ranks (and, for DeepSpeed, the optimizer may step) only on the last one, except
        under FSDP2, which reduce-scatters each micro-batch's gradients into the shards."""
        last = index == count - 1
        if self.kind == "fsdp2":
            # gradients are reduce-scattered after every micro-batch and summed as shards:
            # skipping the sync (as DDP does) keeps every unsharded gradient, a whole model's
            # worth per rank, from one micro-batch to the next
            yield
        elif self.kind == "deepspeed":
            # accelerate's DeepSpeed wrapper sets the engine's accumulation boundary from
            # sync_gradients and steps the engine in `backward` when it is True; outside
            # `accelerator.accumulate` it stays True, which stepped every micro-batch
            self.accelerator.gradient_state._set_sync_gradients(last)
            try:
                yield
            finally:
                self.accelerator.gradient_state._set_sync_gradients(True)
        elif self.kind == "ddp" and not last:
            with self.accelerator.no_sync(self.model):
                yield
        else:
            yield

    def backward(self, loss: Tensor) -> None:
        if self.kind == "fsdp2":
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the global gradient norm, step the optimizer once; the pre-clip norm."""
        model, optimizer = self._prepared()
        if self.kind == "deepspeed":
            # the engine clipped (config gradient_clipping) and stepped in `backward` at the
            # accumulation boundary; report its norm
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            gn = engine.get_global_grad_norm()
            optimizer.step()  # accelerate's wrapper: a no-op under DeepSpeed
            return float(gn) if gn is not None else float("nan")
        if self.kind == "fsdp2":
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            gn = gn.full_tensor() if _is_dtensor(gn) else gn
        else:
            gn = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        gn = float(gn)
        if not torch.isfinite(torch.tensor(gn)):
            return gn
        optimizer.step()
        return gn

    # ---- checkpoints ----
    lora: LoraConfig | None = None  # model.lora when the model carries adapters: set by the trainer

    def full_model_state(self) -> dict[str, Tensor] | None:
        """Gathered fp32 state dict on the CPU (collective: call on every rank); None when the
        plain module's own state dict will do. Under model.lora: the merged model's state,
        carrying the adapters (`lora.LoraState`; None on ranks that keep no copy)."""
        state = self._full_model_state()
        if self.lora is None:
            return state

        if state is None and self.kind == "deepspeed" and self.sharded:
            return None
        if state is None:
            state = {k: v.detach().cpu() for k, v in
                     self.accelerator.unwrap_model(self.model).state_dict().items()}
        return checkpoint_state(state, self.lora)

    def _full_model_state(self) -> dict[str, Tensor] | None:
        if self.kind == "deepspeed" and self.sharded:  # ZeRO-3: gather each parameter

            # every rank takes part in each gather, only the writer keeps the (copied) tensors:
            # a copy on every rank held the whole model world times
            keep = self.accelerator.is_main_process
            state = {n: t.cpu() for n, t in full_named_parameters(self.model, self.accelerator)
                     if keep}
            return state if keep else None
        if self.kind != "fsdp2":
            return None

        full = get_model_state_dict(
            self._prepared()[0], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return cast("dict[str, Tensor]", full)  # full_state_dict: plain CPU tensors

    def optimizer_state(self) -> dict[str, Any] | None:
        """The whole optimizer state, gathered (collective), keyed by parameter name; None: use
        `optimizer.state_dict()` on the main process."""
        if self.kind != "fsdp2":
            return None

        return get_optimizer_state_dict(
            *self._prepared(),
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    @property
    def ranks_write_optimizer(self) -> bool:
        """Whether every rank writes its own optimizer file into a checkpoint (DeepSpeed: the
        ZeRO partitions, `zero_state.py`) instead of the main process writing one full state."""
        return self.kind == "deepspeed"

    def save_rank_optimizer(self, folder: Path) -> None:
        """This rank's optimizer partition into the checkpoint folder being written (every
        rank calls it; only under `ranks_write_optimizer`)."""
        zero_state.save(self.accelerator.deepspeed_engine_wrapped.engine, folder,
                        self.accelerator.process_index, self.world)

    def load_checkpoint_optimizer(self, ckpt: Path) -> None:
        """Restore the optimizer from a checkpoint folder (every rank calls it)."""
        if is_dcp(ckpt):  # model and optimizer, resharded to this run's layout
            return load_into_strategy(ckpt, self)
        if zero_checkpoint.is_zero(ckpt):  # DeepSpeed's own per-rank format: model and optimizer
            return zero_checkpoint.load_into_strategy(ckpt, self)
        if self.kind == "deepspeed":
            zero_state.load(self.accelerator.deepspeed_engine_wrapped.engine, ckpt,
                            self.accelerator.process_index, self.world)
            return
        written = zero_state.written_world(ckpt)
        if written is not None:
            raise zero_state.not_resumable_here(ckpt, written)
        self.load_optimizer_state(torch.load(ckpt / OPTIM_FILE, weights_only=True))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a state from `optimizer_state` (every rank reads the same full file and keeps
        its own shard)."""
        model, optimizer = self._prepared()
        if self.kind != "fsdp2":
            optimizer.load_state_dict(state)
            return

        set_optimizer_state_dict(
            model, optimizer, optim_state_dict=state,
            options=StateDictOptions(full_state_dict=True),
        )

    # ---- the manifest ----
    def describe(self) -> dict[str, Any]:
        """What ran, measured on the prepared model and optimizer (for manifest.json)."""
        model, optimizer = self._prepared()
        params = list(model.parameters())
        p0 = params[0]
        inner: Any = optimizer  # accelerate's wrapper > DeepSpeed's ZeRO optimizer > torch's
        flat: list[Tensor] = []
        while hasattr(inner, "optimizer"):
            flat += list(getattr(inner, "fp32_partitioned_groups_flat", []))  # ZeRO-3 masters
            inner = inner.optimizer
        state_dtypes = sorted({str(v.dtype).removeprefix("torch.")
                               for s in inner.state.values() for v in s.values()
                               if isinstance(v, Tensor) and v.dim() > 0})
        master = sorted({str(p.dtype).removeprefix("torch.")
                         for g in inner.param_groups for p in g["params"]} |
                        {str(t.dtype).removeprefix("torch.") for t in flat})
        base = unwrap(model)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
        out = {
            "strategy": self.kind,
            "world_size": self.world,
            "sharded": self.sharded,
            "param_class": type(p0).__name__,
            "param_dtype": str(p0.dtype).removeprefix("torch."),
            "master_dtype": ",".join(master),
            "optimizer_state_dtype": ",".join(state_dtypes) or "float32 (AdamW: like params)",
            "compute_dtype": str(self.precision.compute).removeprefix("torch."),
            "mixed_precision": self.precision.mixed_precision,
            "param_bytes_per_rank": local_param_bytes(model),
            "num_parameters": total,
            "trainable_parameters": sum(  # model.lora: the adapters only
                getattr(p, "ds_numel", p.numel()) for p in base.parameters() if p.requires_grad),
        }
        if self.kind == "deepspeed":
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            out["zero_stage"] = getattr(plugin, "zero_stage", None)
        return out


__all__ = ["Strategy", "build_accelerator", "detect_kind", "local_param_bytes",
           "share_fp32_masters"]
