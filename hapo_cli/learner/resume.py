"""Which checkpoint a `--resume` continues from: the newest one whose files all load.

A checkpoint folder appears atomically (written to a temporary folder, then renamed), but a
disk can still corrupt it later, or a user can. A corrupt latest checkpoint must not end the
run with a traceback when an older good one exists: `usable_checkpoint` probes each, newest
first, and reports the ones it skipped so the CLI can say so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from analysis import schema

from ..errors import RunDirError, first_line
from ..models import ModelError, check_model_dir
from ..runlog import _recipe_diff
from . import zero_state
from .checkpoint import STATE_FILE, list_checkpoints, recipe_fingerprint
from .dcp_checkpoint import is_dcp, probe_dcp
from .zero_checkpoint import is_zero, probe_zero

if TYPE_CHECKING:
    from ..recipe import Recipe


def probe_checkpoint(ckpt: Path) -> None:
    """Raise (any exception, with a readable message) unless every file of `ckpt` loads:
    trainer state JSON with its step, the HF folder (config, tokenizer, safetensors headers),
    and every torch file through `weights_only` (memory-mapped, so this is cheap)."""
    meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{STATE_FILE}: no integer 'step'")
    zero_files = zero_state.written_world(ckpt) is not None or is_zero(ckpt)
    if zero_files and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("holds DeepSpeed ZeRO optimizer partitions, and deepspeed is not "
                         "installed (pip install 'hapo[deepspeed]')")
    if is_dcp(ckpt):  # shards, index, config and tokenizer; then the small torch files
        probe_dcp(ckpt)
    elif is_zero(ckpt):  # every rank's DeepSpeed files, config and tokenizer
        probe_zero(ckpt)
    else:
        check_model_dir(ckpt)
    for f in sorted(ckpt.glob("*.pt")):  # (zero/: probe_zero)
        try:
            if zero_state.PATTERN.match(f.name):
                zero_state.load_file(f)  # DeepSpeed's own classes allowed, nothing else
            else:
                torch.load(f, weights_only=True, map_location="cpu", mmap=True)
        except Exception as exc:  # UnpicklingError (refused pickle), RuntimeError (corrupt zip)
            raise ValueError(f"{f.name}: cannot be loaded safely ({first_line(exc)})") from None


# What the manifest records of the recipe (every run writes these): key -> the recipe's value.
MANIFEST_FIELDS = {
    "seed": lambda r: r.seed,
    "components": lambda r: r.components,
    "algo": lambda r: r.algo.baseline,
}


def check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    """RunDirError unless `recipe` is the one the run in `run_dir` was trained with, as its
    manifest (seed, components, baseline) and every checkpoint's recorded recipe say
    (train.max_steps may grow). recipe.yaml is compared by `RunLog.prepare`; these still hold
    when it was deleted, which would otherwise let any recipe continue the run. Reads only."""
    manifest = schema.read_manifest(run_dir)
    if not manifest:
        return  # not a run (RunLog.prepare says so), or nothing recorded to compare with
    gone = "" if (run_dir / schema.RECIPE).exists() else f"{schema.RECIPE} is missing; "
    diffs = [f"{k}: {manifest[k]!r} -> {get(recipe)!r}" for k, get in MANIFEST_FIELDS.items()
             if k in manifest and manifest[k] != get(recipe)]
    source = schema.MANIFEST
    if not diffs:
        new = recipe.model_dump(mode="json")
        for ckpt in reversed(list_checkpoints(run_dir)):
            try:
                meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # a corrupt checkpoint: usable_checkpoint skips it
            old = meta.get("recipe") if isinstance(meta, dict) else None
            if isinstance(old, dict) and meta.get("recipe_hash") != recipe_fingerprint(new):
                diff = _recipe_diff(yaml.safe_dump(old), yaml.safe_dump(new))
                diffs, source = [diff or "its recorded recipe hash"], f"checkpoint {ckpt.name}"
                break
    if diffs:
        raise RunDirError(
            f"{run_dir}: --resume with a different recipe ({gone}{source}: {', '.join(diffs)}); "
            "nothing was changed; use the run's recipe or a new --output"
        )


def usable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that probes clean or None, ['step-000040: reason', ...] skipped)."""
    skipped: list[str] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            probe_checkpoint(ckpt)
        except (ModelError, ValueError, OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{ckpt.name}: {first_line(exc)}")
            continue
        return ckpt, skipped
    return None, skipped
