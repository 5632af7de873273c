"""Checkpoints: HF save_pretrained + optimizer/scheduler/RNG/data-stream/entropy-stats state,
written to a temporary folder and renamed, so a killed run never leaves a half checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from analysis import schema

from .. import algo
from ..lora import LoraState, save_adapters
from ..recipe import stable_hash
from ..runlog import RESUMABLE_FIELDS
from .state import LoopState

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
SCHED_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / schema.checkpoint_dir(step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / schema.CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    steps = {p: s for p in root.iterdir()
             if p.is_dir() and (s := schema.checkpoint_step(p.name)) is not None
             and (p / STATE_FILE).exists()}
    return sorted(steps, key=lambda p: steps[p])


def checkpoints_by_step(run_dir: Path) -> dict[int, Path]:
    """``{step: checkpoint dir}`` of ``list_checkpoints``, in step order."""
    return {s: p for p in list_checkpoints(run_dir)
            if (s := schema.checkpoint_step(p.name)) is not None}


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def temporary_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before its rename."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(f".{final.name}.tmp")


def fresh_temporary_dir(run_dir: Path, step: int) -> Path:
    """An empty `temporary_dir` (a killed run's leftover removed): main process only."""
    tmp = temporary_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def recipe_fingerprint(recipe: dict) -> str:
    """Hash of a resolved recipe (as a dict) less the fields a resume may change
    (`runlog.RESUMABLE_FIELDS`: train.max_steps, how checkpoints are written)."""
    out = dict(recipe)
    for field in RESUMABLE_FIELDS:
        section, key = field.split(".")
        out[section] = {k: v for k, v in (out.get(section) or {}).items() if k != key}
    return stable_hash(out)


def recorded_recipe(run_dir: Path) -> dict:
    """{"recipe": the run's resolved recipe, "recipe_hash": its fingerprint}, from the run's
    recipe.yaml (written before the first step), for trainer_state.json: a checkpoint then
    says what it was trained with even when recipe.yaml is gone. {} without a readable one."""
    try:
        recipe = yaml.safe_load((Path(run_dir) / schema.RECIPE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(recipe, dict):
        return {}
    return {"recipe": recipe, "recipe_hash": recipe_fingerprint(recipe)}


def save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, stream, state, keep=2,
                    model_state=None, optim_state=None, ranks_wrote_optimizer=False):
    """`model_state` / `optim_state`: full (gathered) states of a sharded model and optimizer,
    saved instead of the module's and optimizer's own (which hold this rank's shard only).
    `ranks_wrote_optimizer`: every rank has already written its optimizer partition into
    `temporary_dir` (DeepSpeed ZeRO, `zero_state.py`), so that folder is kept and no
    `optimizer.pt` is written."""
    final = checkpoint_dir(run_dir, step)
    tmp = temporary_dir(run_dir, step) if ranks_wrote_optimizer else fresh_temporary_dir(run_dir,
                                                                                          step)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    if isinstance(model_state, LoraState):  # model.lora: the adapters beside it
        save_adapters(tmp, model_state.adapters, model_state.cfg)
    tokenizer.save_pretrained(tmp)
    if not ranks_wrote_optimizer:
        torch.save(optim_state if optim_state is not None else optimizer.state_dict(),
                   tmp / OPTIM_FILE)
    write_trainer_files(tmp, run_dir, step, scheduler, stream, state)
    publish(tmp, final, run_dir, keep)
    return final


def write_trainer_files(tmp: Path, run_dir: Path, step: int, scheduler, stream, state,
                        **extra) -> None:
    """The small, rank-independent part of a checkpoint (main process): scheduler, the torch
    RNG, and trainer_state.json (step, recorded recipe, data stream, entropy stats; `extra`
    keys such as the checkpoint format)."""
    torch.save(scheduler.state_dict(), tmp / SCHED_FILE)
    torch.save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
    meta = {
        "step": step,
        **extra,
        **recorded_recipe(run_dir),
        "stream": stream.state_dict(),
        "entropy_stats": state.entropy_stats.to_dict() if state.entropy_stats else None,
        "critical_threshold": state.critical_threshold,
        "last_val": state.last_val,
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))


def new_run_command(run_dir: Path, model_dir: str | Path) -> str:
    """The command that starts a new run (the same recipe) from the weights in `model_dir`,
    a save_pretrained folder: what converts a checkpoint another strategy cannot resume (its
    optimizer state and data position start afresh)."""
    return (f"hapo train --recipe {Path(run_dir) / schema.RECIPE} --set model.init=pretrained "
            f"--set model.path={model_dir} --set model.tiny=null --set model.warmup=null "
            "--output NEW_RUN")


def publish(tmp: Path, final: Path, run_dir: Path, keep: int) -> None:
    """The atomic marker of a complete checkpoint: rename its finished temporary folder to
    `final`, then delete all but the newest `keep` checkpoints (main process)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt: Path, optimizer, scheduler, stream):
    """`optimizer`: a torch optimizer, or a learner `Strategy` (which reads the checkpoint's
    optimizer files itself: the full state, every rank keeping its shard, or under DeepSpeed
    each rank's own partition)."""
    meta = json.loads((ckpt / STATE_FILE).read_text())
    if hasattr(optimizer, "load_checkpoint_optimizer"):
        optimizer.load_checkpoint_optimizer(ckpt)
    else:
        optimizer.load_state_dict(torch.load(ckpt / OPTIM_FILE, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / SCHED_FILE, weights_only=True))
    rng = torch.load(ckpt / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    stream.load_state_dict(meta["stream"])
    stats = meta.get("entropy_stats")
    return LoopState(
        step=int(meta["step"]),
        entropy_stats=algo.EntropyStats.from_dict(stats) if stats else None,
        critical_threshold=meta.get("critical_threshold"),
        last_val=meta.get("last_val") or {},
    )
