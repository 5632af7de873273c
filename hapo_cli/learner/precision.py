"""The learner's precision: fp32 master weights and optimizer state always, a compute dtype
from `model.dtype` / `train.mixed_precision` (see strategy.py for how each strategy applies it)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import HapoError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MP_OF = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def env_true(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # matmul dtype of forward/backward
    master: torch.dtype = torch.float32  # stored parameters and optimizer state

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the compute dtype: 'no', 'bf16' or 'fp16'."""
        return _MP_OF[self.compute]


def resolve_precision(model_dtype: str, mixed_precision: str, *,
                      cuda: bool | None = None) -> Precision:
    """fp32 masters always; compute in `model.dtype`, or in `train.mixed_precision` when the
    model dtype is float32. A bf16 model with fp16 mixed precision (or the reverse) is refused,
    and so is float16 compute without CUDA: accelerate does not autocast fp16 on CPU, so such a
    run would compute in fp32 while its manifest said float16 (`cuda`: None = ask torch)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda and "float16" in (model_dtype, {"fp16": "float16"}.get(mixed_precision)):
        field = (f"model.dtype={model_dtype}" if model_dtype == "float16"
                 else f"train.mixed_precision={mixed_precision}")
        raise HapoError(f"{field}: float16 compute needs a CUDA GPU (without one accelerate "
                        "computes in fp32); use model.dtype=bfloat16 or "
                        "train.mixed_precision=bf16")
    compute = _DTYPES[model_dtype]
    if mixed_precision != "no":
        mp = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        if compute not in (torch.float32, mp):
            raise HapoError(
                f"model.dtype={model_dtype} and train.mixed_precision={mixed_precision} disagree "
                f"on the compute dtype (set train.mixed_precision={_MP_OF[compute]} or no)"
            )
        compute = mp
    return Precision(compute=compute)


def compute_autocast(precision: Precision, device: torch.device):
    """An autocast context for code that runs outside the model's (autocast-wrapped) forward."""
    if precision.compute == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.compute)
