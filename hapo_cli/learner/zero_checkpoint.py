"""Resume checkpoints under DeepSpeed ZeRO in DeepSpeed's own per-rank format: every rank writes
its own partition, nothing is gathered.

    checkpoints/step-000040/
      trainer_state.json      step, "format": "zero", recipe, data stream, entropy stats
      scheduler.pt, rng.pt    the LR schedule, the torch RNG            (main process, once)
      config.json, generation_config.json, tokenizer files              (for `hapo export`)
      zero/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's fp32 master partition and
                                                          AdamW moments
      zero/*model_states.pt   ZeRO-3: each rank's (placeholders, buffers, parameter shapes);
                              ZeRO-1/2: the main process's module state
      zero_to_fp32.py         DeepSpeed's recovery script (it reads zero/)

Written by `engine.save_checkpoint` (deepspeed/runtime/engine.py), read back by
`engine.load_checkpoint`, and merged into one fp32 state dict in one process by DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` (utils/zero_to_fp32.py, memory-mapped and lazy):
`hapo export` and `hapo evaluate` need no DeepSpeed engine and no GPU.

DCP cannot address ZeRO's flat fp32 partitions (`torch.distributed.checkpoint.get_state_dict`
knows FSDP and plain modules), so this is what log.checkpoint_format=dcp (the default) writes
under DeepSpeed. Like DeepSpeed without its universal-checkpoint conversion it resumes on the
number of ranks that wrote it; another number, or another strategy, is one line naming the
commands that convert its weights into a new run. The save is synchronous (DeepSpeed's default
checkpoint engine). log.checkpoint_format=hf keeps the older layout (`zero_state.py`: the main
process's gathered HF folder beside each rank's partition).
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

from analysis import schema

from ..errors import HapoError
from .checkpoint import (
    checkpoint_dir,
    fresh_temporary_dir,
    new_run_command,
    publish,
    temporary_dir,
)
from .dcp_checkpoint import is_dcp, probe_config_files
from .zero_state import safe_loading

FORMAT = "zero"
ZERO_DIR = "zero"  # DeepSpeed's checkpoint tag: the folder of its files
OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def is_zero(ckpt: Path) -> bool:
    """Whether `ckpt` is a checkpoint in DeepSpeed's per-rank format (this module)."""
    folder = Path(ckpt) / ZERO_DIR
    return folder.is_dir() and any(OPTIM.match(f.name) for f in folder.iterdir())


def is_sharded(ckpt: Path) -> bool:
    """Whether `ckpt` holds its weights in per-rank shards (DCP or DeepSpeed's), with config and
    tokenizer beside them; else it is a save_pretrained folder (+ optimizer files)."""
    return is_dcp(ckpt) or is_zero(ckpt)


def written_world(ckpt: Path) -> int:
    """The number of data-parallel ranks that wrote `ckpt`, as DeepSpeed recorded it
    (`dp_world_size` of its model-state file; ValueError without a readable one)."""
    files = sorted((Path(ckpt) / ZERO_DIR).glob("*model_states.pt"))
    if not files:
        raise ValueError(f"{ZERO_DIR}/: no *model_states.pt")
    try:
        with safe_loading():
            state = torch.load(files[0], weights_only=True, map_location="cpu", mmap=True)
        return int(state["dp_world_size"])
    except Exception as exc:  # a truncated zip, a refused pickle, no such key
        raise ValueError(f"{ZERO_DIR}/{files[0].name}: cannot be loaded safely "
                         f"({type(exc).__name__})") from None


def probe_zero(ckpt: Path) -> None:
    """ValueError unless every rank's partition file is there and every file of the DeepSpeed
    folder loads through `weights_only` (memory-mapped: cheap); plus config and tokenizer."""
    folder = Path(ckpt) / ZERO_DIR
    world = written_world(ckpt)
    have = {int(m.group(1)) for f in folder.iterdir() if (m := OPTIM.match(f.name))}
    missing = sorted(set(range(world)) - have)
    if missing:
        raise ValueError(f"{ZERO_DIR}/: no partition of rank {missing[0]} (of {world})")
    for f in sorted(folder.glob("*.pt")):
        try:
            with safe_loading():
                torch.load(f, weights_only=True, map_location="cpu", mmap=True)
        except Exception as exc:  # a truncated zip, a refused pickle
            raise ValueError(f"{ZERO_DIR}/{f.name}: cannot be loaded safely "
                             f"({type(exc).__name__})") from None
    probe_config_files(ckpt)


def _engine(strategy):
    return strategy.accelerator.deepspeed_engine_wrapped.engine


class ZeroCheckpointer:
    """Writes checkpoints with DeepSpeed's `engine.save_checkpoint` (every rank its files, in
    parallel); the same calls as `dcp_checkpoint.Checkpointer`, synchronous."""

    format = FORMAT

    def __init__(self, run_dir: Path, strategy, *, keep: int):
        self.run_dir, self.strategy, self.keep = Path(run_dir), strategy, keep
        self.accelerator = strategy.accelerator
        self.main = self.accelerator.is_main_process

    def save(self, step: int, model, optimizer, write_small) -> None:
        """Checkpoint `step` (collective). `write_small(folder)`: the main process's files."""
        del model, optimizer  # the engine holds both
        tmp = temporary_dir(self.run_dir, step)
        if self.main:
            fresh_temporary_dir(self.run_dir, step)
            write_small(tmp)
        self.accelerator.wait_for_everyone()  # the folder exists before any rank writes
        _engine(self.strategy).save_checkpoint(str(tmp), tag=ZERO_DIR, save_latest=False)
        self.accelerator.wait_for_everyone()  # every rank's files are on disk
        if self.main:
            publish(tmp, checkpoint_dir(self.run_dir, step), self.run_dir, self.keep)
        self.accelerator.wait_for_everyone()

    def wait(self) -> None:
        """Nothing is in flight: `save` returns once the checkpoint is published."""

    def abandon(self) -> None:
        """Nothing is in flight (`wait`)."""


def not_resumable_here(ckpt: Path, world: int, why: str) -> HapoError:
    run, step = Path(ckpt).parent.parent, schema.checkpoint_step(Path(ckpt).name)
    return HapoError(
        f"{ckpt}: holds DeepSpeed ZeRO partitions for {world} ranks ({why}); resume it under "
        "DeepSpeed (accelerate launch --config_file recipes/accelerate/zero2.yaml or zero3.yaml "
        f"--num_processes {world}), or convert its weights into a new run (optimizer state and "
        f"data position start afresh): hapo export {run} --step {step} --out DIR, then "
        f"{new_run_command(run, 'DIR')}")


def load_into_strategy(ckpt: Path, strategy) -> None:
    """Restore model and optimizer (fp32 masters, moments, the engine's step counters) from
    `ckpt` (every rank calls it); another world size or strategy is one line."""
    world = written_world(ckpt)
    if strategy.kind != "deepspeed":
        raise not_resumable_here(ckpt, world, f"which {strategy.kind} cannot resume")
    if world != strategy.world:
        raise not_resumable_here(ckpt, world, f"this run has {strategy.world}")
    # each rank reads its own partition (a rigid checkpoint: DeepSpeed loads no other rank's);
    # the weights come from the fp32 masters (zero_load_from_fp32_weights, DeepSpeed's default)
    path, _ = _engine(strategy).load_checkpoint(
        str(ckpt), tag=ZERO_DIR, load_module_strict=True, load_optimizer_states=True,
        load_lr_scheduler_states=False)
    if path is None:
        raise HapoError(f"{ckpt}: DeepSpeed found no checkpoint in {ZERO_DIR}/")


def full_state_dict(ckpt: Path) -> dict[str, Any]:
    """{name: lazily loaded fp32 tensor} of the whole model, in one process (no engine):
    DeepSpeed's merge of every rank's fp32 partition, tied weights under each of their names.
    `.contiguous()` on a value materialises it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with redirect_stdout(io.StringIO()):  # its progress prints
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ZERO_DIR, lazy_mode=True)


def load_model_weights(ckpt: Path, model) -> None:
    """Fill an unsharded `model` (one plain process) with the checkpoint's fp32 weights and
    buffers, one tensor at a time."""
    state = full_state_dict(ckpt)
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state) - _non_persistent(model))
    if missing:
        raise HapoError(f"{ckpt}: the ZeRO checkpoint holds no {missing[0]} "
                        f"({len(missing)} tensors missing)")
    with torch.no_grad():
        for name, lazy in state.items():
            if name in own:
                t = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()
                own[name].copy_(t)


def _non_persistent(model) -> set[str]:
    return {f"{m}.{b}" if m else b for m, mod in model.named_modules()
            for b in mod._non_persistent_buffers_set}


__all__ = ["FORMAT", "ZERO_DIR", "is_zero", "is_sharded", "written_world", "probe_zero", "ZeroCheckpointer",
           "not_resumable_here", "load_into_strategy", "full_state_dict", "load_model_weights"]
