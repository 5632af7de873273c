"""Sharded start-up under FSDP2: each rank reads only its own slices of the policy's
safetensors, so no rank ever holds the full fp32 model.

    meta model (from config.json)  ->  fully_shard (DTensor shards, still meta)
        ->  to_empty (this rank's shard storage)  ->  each shard filled from
            safe_open(file).get_slice(name)[rows of this rank]   (cast to the master dtype)

Compared with `from_pretrained` on every rank (world x the full model in host memory at once,
then each rank drops all but its 1/world), a rank's peak is its shard plus one parameter's
slice. The loaded parameters equal those of a full load sharded by `fully_shard` bit for bit
(tests/test_sharded_load.py): the same bytes, cast the same way.

Buffers are not in the checkpoint (a decoder's rotary `inv_freq` is computed at construction):
the model is built with real buffers and meta parameters (`init_empty_weights(include_buffers=
False)`), and the buffers are put back after `to_empty`. A folder this cannot address (no
safetensors, a parameter under another name or shape) is loaded the old way: `supported` says
so before anything is built.

DeepSpeed ZeRO-3 (`load_policy_zero3`): the same meta model, then each parameter in turn gets
DeepSpeed's partition (`ds_tensor`: this rank's 1/world of the flattened, padded parameter,
DeepSpeed's own `partition()` on an unwritten full-size buffer) filled from the rows of the
safetensors that cover its flat range. `from_pretrained` under `zero.Init` instead initialises
every parameter, broadcasts it from rank 0, then gathers each one in full on every rank while
rank 0 copies it from the whole state dict it read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..model_dirs import load_tokenizer, quiet_transformers
from .fsdp2 import apply_fsdp2
from .precision import env_true

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(path: Path) -> dict[str, Path] | None:
    """{tensor name: the safetensors file holding it}; None without safetensors weights."""
    path = Path(path)
    if (path / INDEX).is_file():
        idx = json.loads((path / INDEX).read_text(encoding="utf-8"))
        return {k: path / f for k, f in idx["weight_map"].items()}
    if (path / SINGLE).is_file():
        with safe_open(path / SINGLE, "pt") as f:
            return {k: path / SINGLE for k in f.keys()}
    return None


def _shapes(files: dict[str, Path]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                out[k] = list(f.get_slice(k).get_shape())
    return out


def build_empty(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The policy's architecture with meta parameters and real (computed) buffers."""
    quiet_transformers()
    config = AutoConfig.from_pretrained(path, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # construction under init_empty_weights leaves a tied head untied
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model


def supported(path: Path, model: nn.Module) -> str | None:
    """None when every parameter of `model` (a tied one once) is in the folder's safetensors
    with its shape; else why not (the caller then loads the full model on every rank)."""
    files = weight_files(path)
    if files is None:
        return "no safetensors weights"
    shapes = _shapes(files)
    for name, p in model.named_parameters():  # tied parameters are listed once
        if name not in files:
            return f"parameter {name} not in the weight files"
        if shapes[name] != list(p.shape):
            return f"parameter {name}: shape {shapes[name]} in the files, {list(p.shape)} here"
    return None


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate this rank's shards (`to_empty`) keeping the constructed buffers."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])


def fill_shards(model: nn.Module, path: Path) -> int:
    """Copy each parameter's local rows from the safetensors files into its shard (a DTensor's
    local tensor, or a plain tensor whole); the number of bytes read."""
    files = weight_files(path)
    assert files is not None
    handles = {f: safe_open(f, "pt") for f in set(files.values())}
    read = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            sl = handles[files[name]].get_slice(name)
            if hasattr(p, "to_local"):  # DTensor: only this rank's block
                dt = cast("DTensor", p)
                shape, offset = compute_local_shape_and_global_offset(
                    dt.shape, dt.device_mesh, dt.placements)
                local = dt.to_local()
                if local.numel() == 0:
                    continue
                index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                part = sl[index]
                local.copy_(part.reshape(local.shape))
            else:
                part = sl[:]
                p.copy_(part)
            read += part.numel() * part.element_size()
    return read


def _flat_range(sl, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor behind safetensors slice `sl`, reading
    only the rows (along dim 0) that hold them."""
    shape = list(sl.get_shape())
    if not shape:
        return sl[...].reshape(-1)[start:stop]  # a scalar: `[:]` is refused on 0-dim
    row = 1
    for d in shape[1:]:
        row *= d
    first, last = start // row, -(-stop // row)
    part = sl[first:last].reshape(-1)
    return part[start - first * row: stop - first * row]


def fill_partitions(model: nn.Module, path: Path, init) -> int:
    """Turn each (meta) parameter of `model` into a ZeRO-3 parameter whose partition holds this
    rank's flat range from the safetensors files (`init`: a `deepspeed.zero.Init`, not entered);
    the number of bytes read. A tied parameter is converted once and stays shared."""
    files = weight_files(path)
    assert files is not None
    handles = {f: safe_open(f, "pt") for f in set(files.values())}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, key))
    read = 0
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            # a full-size buffer that is never written: DeepSpeed's `partition()` copies this
            # rank's range out of it (on CPU its pages are never touched), then frees it
            new: Any = nn.Parameter(  # + DeepSpeed's ds_* attributes and methods below
                torch.empty(p.shape, dtype=p.dtype, device=init.local_device),
                requires_grad=p.requires_grad)
            for module, key in owners[id(p)]:
                module._parameters[key] = new
            init._convert_to_deepspeed_param(new)
            new.partition()
            size = new.ds_tensor.ds_numel
            start = size * new.ds_zero_partition_rank
            stop = min(start + size, new.ds_numel)
            if stop > start:
                part = _flat_range(handles[files[name]].get_slice(name), start, stop)
                new.ds_tensor[: stop - start].copy_(part)
                read += part.numel() * part.element_size()
    return read


def load_policy_zero3(path: Path, strategy, trust_remote_code: bool = False):
    """(model with ZeRO-3 partitioned parameters, tokenizer), or None when the folder's layout
    needs the full load (`supported`). Every rank calls it."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config
    from transformers.modeling_utils import set_zero3_state

    with set_zero3_state():  # a meta model, not transformers' own zero.Init construction
        model = build_empty(path, strategy.load_dtype, trust_remote_code)
    if supported(path, model) is not None:
        return None
    init = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(), dtype=strategy.load_dtype)
    fill_partitions(model, path, init)
    return model, load_tokenizer(path, trust_remote_code)


def load_policy_sharded(path: Path, strategy, trust_remote_code: bool = False):
    """(model already under `fully_shard`, tokenizer), or None when the folder's layout needs
    the full load (`supported`). Every rank calls it."""
    model = build_empty(path, strategy.load_dtype, trust_remote_code)
    if supported(path, model) is not None:
        return None
    offload = env_true("FSDP_OFFLOAD_PARAMS")
    device = torch.device("cpu") if offload else strategy.accelerator.device
    apply_fsdp2(model, strategy.precision, device,
                reshard_after_forward=env_true("FSDP_RESHARD_AFTER_FORWARD", "true"),
                offload=offload, materialized=False)
    materialize(model, device)
    fill_shards(model, path)
    return model, load_tokenizer(path, trust_remote_code)


__all__ = ["weight_files", "build_empty", "supported", "materialize", "fill_shards",
           "fill_partitions", "load_policy_sharded", "load_policy_zero3"]
