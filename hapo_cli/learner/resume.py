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

import torch

from ..errors import first_line
from ..models import ModelError, check_model_dir
from . import zero_state
from .checkpoint import STATE_FILE, list_checkpoints


def probe_checkpoint(ckpt: Path) -> None:
    """Raise (any exception, with a readable message) unless every file of `ckpt` loads:
    trainer state JSON with its step, the HF folder (config, tokenizer, safetensors headers),
    and every torch file through `weights_only` (memory-mapped, so this is cheap)."""
    meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{STATE_FILE}: no integer 'step'")
    check_model_dir(ckpt)
    zero_files = zero_state.written_world(ckpt) is not None
    if zero_files and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("holds DeepSpeed ZeRO optimizer partitions, and deepspeed is not "
                         "installed (pip install 'hapo[deepspeed]')")
    for f in sorted(ckpt.rglob("*.pt")):
        try:
            if zero_state.PATTERN.match(f.name):
                zero_state.load_file(f)  # DeepSpeed's own classes allowed, nothing else
            else:
                torch.load(f, weights_only=True, map_location="cpu", mmap=True)
        except Exception as exc:  # UnpicklingError (refused pickle), RuntimeError (corrupt zip)
            raise ValueError(f"{f.name}: cannot be loaded safely ({first_line(exc)})") from None


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
