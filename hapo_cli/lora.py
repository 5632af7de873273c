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
from collections.abc import Iterator
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
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
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


# ---------------------------------------------------------------------------------------------
# merged weights for an engine that loads them (vLLM colocated and servers)
# ---------------------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."  # a PeftModel's wrapper (inject_adapter_in_model adds none)


def base_param_name(name: str) -> str:
    """A LoRA model's parameter name under the base model's naming: wrapper segments
    (`module.`, `_orig_mod.`, ...) and peft's `base_model.model.` go, and `.base_layer.` becomes
    `.` ('model.q_proj.base_layer.weight' -> 'model.q_proj.weight'). lora_A / lora_B names
    keep their adapter segments."""
    from .rollout.base import clean_param_name

    name = clean_param_name(name)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(_BASE, ".")


def lora_scales(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """{adapted layer's base name: (scale of B A, fan_in_fan_out)} of the default adapter of
    every PEFT LoRA layer in `model` (wrapped or not); {} for a model without adapters.
    The scale is the layer's own `scaling` (alpha / r, or rsLoRA's alpha / sqrt(r))."""
    out: dict[str, tuple[float, bool]] = {}
    for name, m in model.named_modules():
        scaling = getattr(m, "scaling", None)
        if not isinstance(scaling, dict) or not hasattr(m, "lora_A"):
            continue
        if set(scaling) != {"default"}:
            raise HapoError(f"{name}: LoRA adapters {sorted(scaling)}; hapo merges one, 'default'")
        if (getattr(m, "use_dora", None) or {}).get("default"):
            raise HapoError(f"{name}: DoRA adapters cannot be merged for a vLLM engine")
        out[base_param_name(name)] = (float(scaling["default"]),
                                      bool(getattr(m, "fan_in_fan_out", False)))
    return out


def merged_named_parameters(pairs: Iterator[tuple[str, Tensor]],
                            scales: dict[str, tuple[float, bool]]) -> Iterator[tuple[str, Tensor]]:
    """The merged model's (name, tensor) pairs from a LoRA model's (full, gathered)
    parameters, lazily: base names (`base_param_name`), W + scale * B @ A in every adapted
    layer (computed in fp32, in W's dtype, as `split_state` writes checkpoints), lora_A /
    lora_B not sent, every other tensor passed through as it came (never a copy, never
    modified: the live model is untouched). A layer's W, A and B may come in any order; each
    is held only until its layer is complete."""
    pending: dict[str, dict[str, Tensor]] = {}
    for raw, t in pairs:
        name = base_param_name(raw)
        layer, lora, rest = name.partition(".lora_")
        if lora:  # 'A.default.weight' / 'B.default.weight'
            part = rest.split(".")[0]
            if part not in ("A", "B") or rest != f"{part}.default.weight":
                raise HapoError(f"{raw}: a LoRA tensor hapo cannot merge (only linear "
                                "lora_A / lora_B of the 'default' adapter)")
            key = part
        elif name.endswith(".weight") and name[: -len(".weight")] in scales:
            layer, key = name[: -len(".weight")], "W"
        else:
            yield name, t
            continue
        if layer not in scales:
            raise HapoError(f"{raw}: LoRA tensor of a layer without a LoRA scale")
        got = pending.setdefault(layer, {})
        got[key] = t
        if len(got) == 3:
            del pending[layer]
            w, a, b = got["W"], got["A"].float(), got["B"].float()  # (out, in), (r, in), (out, r)
            scale, fan_in_fan_out = scales[layer]
            delta = scale * (b @ a)  # (out, in)
            yield f"{layer}.weight", (w.float() + (delta.T if fan_in_fan_out else delta)).to(w.dtype)
    if pending:
        layer, got = next(iter(pending.items()))
        raise RuntimeError(f"LoRA layer {layer}: got only {sorted(got)} of W, A, B")


def engine_weights(model: nn.Module, pairs: Iterator[tuple[str, Tensor]]
                   ) -> Iterator[tuple[str, Tensor]]:
    """What an engine that loads weights receives from `model`'s full parameters `pairs`:
    the merged model's under `model.lora`, else `pairs` themselves."""
    scales = lora_scales(model)
    return merged_named_parameters(pairs, scales) if scales else pairs
