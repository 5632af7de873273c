"""Hugging Face folders from a run: `hapo export RUN [--step N] [--dtype D] --out DIR`, the
exports a run writes itself (`log.export_every`, the end of the run), and loading any
checkpoint (DCP, DeepSpeed ZeRO, or a save_pretrained folder) as a model for `hapo evaluate`.

A sharded checkpoint holds config.json and the tokenizer beside its shards, so one plain process
builds the model from the config, fills the unsharded weights from however many ranks wrote
them (DCP's load; for DeepSpeed ZeRO its own merge of the fp32 partitions, `zero_to_fp32`), and
calls `save_pretrained`: loadable by transformers and vLLM.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from analysis import schema

from .errors import HapoError
from .learner import zero_checkpoint
from .learner.checkpoint import checkpoints_by_step
from .learner.dcp_checkpoint import (
    EXPORTS_DIR,
    export_dir,
    load_model_weights,
    write_export,
)
from .learner.zero_checkpoint import is_sharded, is_zero

DTYPES = ("float32", "bfloat16", "float16")


def load_checkpoint_model(ckpt: Path, dtype: str = "float32",
                          trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint: a sharded one (DCP, ZeRO) through its shards, else
    the folder."""
    from .model_dirs import load_policy, load_tokenizer, quiet_transformers

    if not is_sharded(ckpt):
        return load_policy(ckpt, dtype, trust_remote_code)
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    cfg = AutoConfig.from_pretrained(ckpt, local_files_only=True,
                                     trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                             trust_remote_code=trust_remote_code)
    # fp32 masters, exactly as trained
    (zero_checkpoint.load_model_weights if is_zero(ckpt) else load_model_weights)(ckpt, model)
    if (ckpt / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    model.to(getattr(torch, dtype)).eval()
    return model, load_tokenizer(ckpt, trust_remote_code)


def check_checkpoint_dir(path: Path) -> None:
    """ModelError (one line) unless `path` loads as a model: a sharded checkpoint's config,
    tokenizer and shard files, or an HF folder (`check_model_dir`)."""
    from .learner.dcp_checkpoint import probe_dcp
    from .models import ModelError, check_model_dir, check_tokenizer

    path = Path(path)
    if not is_sharded(path):
        check_model_dir(path)
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not an HF model directory)")
    check_tokenizer(path)
    try:
        (zero_checkpoint.probe_zero if is_zero(path) else probe_dcp)(path)
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from None


def engine_folder(ckpt: Path) -> Path:
    """A save_pretrained folder of `ckpt` for an engine that loads from disk (vLLM): the
    folder itself (a model.lora one without its adapters), the run's export of that step, or
    a fresh one in a temporary folder (removed at exit). The run directory is never written."""
    import atexit
    import tempfile

    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        return without_adapters(ckpt)
    step = schema.checkpoint_step(ckpt.name)
    if step is not None:
        done = export_dir(ckpt.parent.parent, step)
        if (done / "config.json").is_file():
            return done
    tmp = Path(tempfile.mkdtemp(prefix="hapo-export-"))
    atexit.register(shutil.rmtree, tmp, True)
    return export_folder(ckpt, tmp / "model")


def without_adapters(folder: Path) -> Path:
    """`folder`, or for a model.lora checkpoint (the merged model beside its adapters) a
    temporary folder (removed at exit) of links to every file but the adapters': vLLM loads
    every *.safetensors of a folder and would take `lora_adapters.safetensors` for weights."""
    import atexit
    import tempfile

    from .lora import ADAPTER_CONFIG, ADAPTER_FILE

    if not (folder / ADAPTER_FILE).is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix="hapo-merged-"))
    atexit.register(shutil.rmtree, tmp, True)
    for f in folder.iterdir():
        if f.name not in (ADAPTER_FILE, ADAPTER_CONFIG):
            (tmp / f.name).symlink_to(f.resolve())
    return tmp


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step` in a run directory (None: the newest); HapoError otherwise."""
    ckpts = checkpoints_by_step(run_dir)
    if not ckpts:
        raise HapoError(f"{run_dir}: no checkpoint (a run directory with checkpoints/step-N)")
    if step is None:
        return ckpts[max(ckpts)]
    if step not in ckpts:
        have = ", ".join(str(s) for s in sorted(ckpts))
        raise HapoError(f"--step {step}: no checkpoint of that step in {run_dir} (have: {have})")
    return ckpts[step]


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None,
                      dtype: str = "float32") -> Path:
    """`hapo export`: the checkpoint's model as a save_pretrained folder at `out`."""
    if dtype not in DTYPES:
        raise HapoError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    ckpt = find_checkpoint(Path(run_dir), step)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HapoError(f"--out {out}: exists and is not an empty folder; choose a new one")
    return export_folder(ckpt, out, dtype)


def export_folder(ckpt: Path, out: Path, dtype: str = "float32") -> Path:
    """Write checkpoint `ckpt` (DCP, ZeRO or HF) as a save_pretrained folder `out` (aside,
    renamed)."""
    model, tok = load_checkpoint_model(ckpt, dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


__all__ = ["EXPORTS_DIR", "export_dir", "write_export", "load_checkpoint_model",
           "find_checkpoint", "export_checkpoint", "export_folder", "check_checkpoint_dir",
           "engine_folder"]
