"""LoRA through PEFT (`model.lora`): adapters injected into the policy in place.

`peft.inject_adapter_in_model` replaces each targeted linear layer by a LoRA layer
(`W x + (alpha/r) B A x`) and keeps the model's own class, so the learner's forwards, the
HF engine's decode (it samples with the adapters: same module) and the fused log-probs see an
ordinary causal LM. Only the adapters train: the base is frozen, A and B are fp32 whatever the
model's dtype, and the optimizer is built over the trainable parameters only.

Checkpoints hold the merged model (`W + (alpha/r) B A`, standard HF names: `hapo evaluate`,
vLLM and export read it as any model) and the adapters (`lora_adapters.safetensors`,
`lora_config.json`); `--resume` loads the unchanged base again and the adapters on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import HapoError

# not PEFT's adapter_model / adapter_config names: transformers would read the folder (a
# plain merged model) as an adapter folder and fail to load it
ADAPTER_FILE = "lora_adapters.safetensors"
ADAPTER_CONFIG = "lora_config.json"
_A, _B, _BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last names of the model's nn.Linear layers, output embedding excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, nn.Linear) and m is not head))


def resolve_targets(model: nn.Module, cfg: Any) -> list[str]:
    """The module names LoRA goes into; HapoError (one line) for a name the model lacks."""
    have = linear_names(model)
    if cfg.target_modules == "all-linear":
        return have
    missing = [t for t in cfg.target_modules if t not in have]
    if missing:
        raise HapoError(f"model.lora.target_modules: {missing[0]!r} is not a linear layer of this "
                        f"model (its linear layers: {', '.join(have)})")
    return list(cfg.target_modules)


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """`model` with LoRA adapters (rank, alpha, dropout, target_modules of `cfg`, a
    `LoraConfig` section), base frozen, adapters fp32 and trainable. In place."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise HapoError("model.lora needs peft (pip install 'hapo[lora]')") from None
    targets = resolve_targets(model, cfg)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return model


def scaling(cfg: Any) -> float:
    """alpha / rank: the factor of B A in every adapted layer."""
    return cfg.alpha / cfg.rank


def split_state(state: dict[str, Tensor], scale: float) -> tuple[dict[str, Tensor],
                                                                   dict[str, Tensor]]:
    """(merged, adapters) of a LoRA model's full state dict: merged has the base model's own
    names with W + scale * B @ A in every adapted layer (in W's dtype, computed in fp32);
    adapters holds the lora_A / lora_B tensors under their names."""
    merged: dict[str, Tensor] = {}
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if _BASE in k:
            layer, _, leaf = k.partition(_BASE)
            if leaf == "weight":
                a, b = state[layer + _A].float(), state[layer + _B].float()  # (r, in), (out, r)
                v = (v.float() + scale * (b @ a)).to(v.dtype)  # (out, in)
            k = f"{layer}.{leaf}"
        merged[k] = v
    return merged, adapters


class LoraState(dict):
    """A merged state dict (what `save_pretrained` writes) that also carries the adapters."""

    adapters: dict[str, Tensor]
    cfg: Any  # the LoraConfig


def checkpoint_state(state: dict[str, Tensor], cfg: Any) -> LoraState:
    merged, adapters = split_state(state, scaling(cfg))
    out = LoraState(merged)
    out.adapters, out.cfg = adapters, cfg
    return out


def save_adapters(folder: Path, adapters: dict[str, Tensor], cfg: Any) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()},
              str(Path(folder) / ADAPTER_FILE))
    (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", **cfg.model_dump(mode="json")}, indent=1))


def load_adapters(model: nn.Module, folder: Path) -> None:
    """Copy a checkpoint's adapters into `model` (same LoRA layout); HapoError if absent."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise HapoError(f"{folder}: no {ADAPTER_FILE}; a model.lora run resumes from its adapters")
    adapters = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [k for k in adapters if k not in params]
    if missing or len(adapters) != sum(".lora_" in k for k in params):
        raise HapoError(f"{path}: adapters do not match model.lora ({len(adapters)} tensors)")
    with torch.no_grad():
        for k, v in adapters.items():
            params[k].copy_(v)
