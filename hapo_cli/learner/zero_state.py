"""DeepSpeed ZeRO optimizer state in an HF-format checkpoint (log.checkpoint_format=hf, and the
checkpoints DeepSpeed runs wrote before `zero_checkpoint.py`): one file per rank.

ZeRO-1/2/3 partition the fp32 master weights and the Adam moments across the data-parallel
ranks, so no rank holds the whole optimizer state. Each rank writes its own partition,
`engine.optimizer.state_dict()` (what DeepSpeed's `engine.save_checkpoint` writes into its
`zero_pp_rank_*_optim_states.pt`, deepspeed/runtime/engine.py `_save_zero_checkpoint`), and
reloads it through `engine.optimizer.load_state_dict` with the engine's own arguments
(`_load_zero_checkpoint`), fp32 masters included: a bf16 run resumes from its fp32 masters,
not from the bf16 weights in the safetensors. The engine's module-state file is not written:
the checkpoint's safetensors already hold the model.

Like DeepSpeed without its universal-checkpoint conversion, a checkpoint resumes on the number
of ranks that wrote it; another number is a one-line error.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import HapoError

PATTERN = re.compile(r"zero-optim-rank(\d{5})-of-(\d{5})\.pt$")


def rank_file(rank: int, world: int) -> str:
    return f"zero-optim-rank{rank:05d}-of-{world:05d}.pt"


def written_world(ckpt: Path) -> int | None:
    """The number of ranks whose partitions `ckpt` holds; None: no ZeRO partitions there."""
    worlds = {int(m.group(2)) for f in Path(ckpt).iterdir() if (m := PATTERN.match(f.name))}
    if not worlds:
        return None
    if len(worlds) > 1:
        raise ValueError(f"ZeRO partitions for different world sizes {sorted(worlds)}")
    return worlds.pop()


def _safe_classes() -> list[Any]:
    """The DeepSpeed classes a ZeRO state dict pickles besides tensors and builtins (the loss
    scaler, the parameter-slice addresses, the stage enum): allowed through `weights_only`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]


@contextmanager
def safe_loading():
    """`torch.load(..., weights_only=True)` accepts ZeRO state files inside this context."""
    with torch.serialization.safe_globals(_safe_classes()):
        yield


def load_file(path: Path, *, mmap: bool = True) -> dict[str, Any]:
    with safe_loading():
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)


def save(engine, folder: Path, rank: int, world: int) -> Path:
    """This rank's partition into `folder` (every rank calls it)."""
    out = Path(folder) / rank_file(rank, world)
    torch.save(engine.optimizer.state_dict(), out)
    return out


def check_world(ckpt: Path, world: int) -> None:
    """HapoError unless `ckpt` holds ZeRO partitions for exactly `world` ranks."""
    got = written_world(ckpt)
    if got is None:
        raise HapoError(
            f"{ckpt}: no ZeRO optimizer partitions ({rank_file(0, world)} ...): it was not "
            "written under DeepSpeed; resume it with the strategy that wrote it")
    if got != world:
        raise HapoError(
            f"{ckpt}: holds ZeRO optimizer partitions for {got} ranks, this run has {world}; "
            f"resume with --num_processes {got}")


def not_resumable_here(ckpt: Path, world: int) -> HapoError:
    """The error for ZeRO partitions (for `world` ranks) met by FSDP2, DDP or one process:
    DeepSpeed resumes them; the checkpoint's HF folder starts a new run anywhere."""
    from .checkpoint import new_run_command

    return HapoError(
        f"{ckpt}: holds DeepSpeed ZeRO optimizer partitions for {world} ranks, which only "
        "DeepSpeed resumes (accelerate launch --config_file recipes/accelerate/zero2.yaml or "
        f"zero3.yaml --num_processes {world}); or convert its weights into a new run "
        "(optimizer state and data position start afresh): "
        f"{new_run_command(Path(ckpt).parent.parent, ckpt)}")


def load(engine, ckpt: Path, rank: int, world: int) -> None:
    """Restore this rank's partition (optimizer moments and fp32 masters) from `ckpt`.

    Every rank's file is opened memory-mapped, as DeepSpeed's engine passes them all: a rigid
    (same world size) checkpoint reads only this rank's tensors."""
    check_world(ckpt, world)
    states = [load_file(Path(ckpt) / rank_file(r, world)) for r in range(world)]
    engine.optimizer.load_state_dict(
        state_dict_list=states,
        load_optimizer_states=True,
        load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
        checkpoint_folder=None,
        load_serial=None,
        param_shapes=engine._get_zero_param_shapes(),
    )


__all__ = ["rank_file", "written_world", "safe_loading", "load_file", "save", "check_world",
           "not_resumable_here", "load"]
