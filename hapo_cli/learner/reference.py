"""The frozen reference policy of the KL penalty (`algo.kl_coef` > 0, `model.reference`).

Loaded once, never trained, placed like the policy: on the learner's device (single, DDP,
ZeRO-1/2: a plain module, no gradient, nothing to synchronise), or sharded with the policy's own
`fully_shard` settings under FSDP2 (every rank runs each forward: the micro-batches, stand-ins
included, are the old-policy pass's). It scores the batch's response tokens at the policy
temperature through `response_logprobs`, with the same `packed` flag and fused head as the policy.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from ..errors import HapoError
from .batch import TrainBatch
from .forward import response_logprobs
from .scoring import policy_temperature


class Reference:
    """A frozen policy that scores batches: `score(batch, micros)` -> (B, T) log-probs."""

    def __init__(self, model, recipe, device, autocast) -> None:
        self.model, self.recipe, self.device, self.autocast = model, recipe, device, autocast

    def score(self, batch: TrainBatch, micros: list[Tensor]) -> Tensor:
        """log pi_ref of the sampled tokens at the policy temperature, (B, T) on the CPU, 0 on
        padding; `micros` the old-policy pass's row indices (an empty one: a stand-in forward
        that keeps this rank in step with the others under FSDP2)."""
        r, dev = self.recipe, self.device
        B, T = batch.response_ids.shape
        out = torch.zeros(B, T)
        with torch.no_grad(), self.autocast():
            for rows in micros:
                stand_in = rows.numel() == 0
                run_rows = torch.tensor([0]) if stand_in else rows
                lp, _ = response_logprobs(
                    self.model, batch.input_ids[run_rows].to(dev),
                    batch.attention_mask[run_rows].to(dev), T,
                    policy_temperature(r, batch, run_rows, dev), fused=r.train.fused_logprobs,
                    chunk_size=r.train.logprob_chunk_size, entropy=False, packed=r.train.packing,
                )
                if not stand_in:
                    out[rows] = lp.float().cpu()
        return out.masked_fill(~batch.mask, 0.0)


def build_reference(recipe, strategy, policy_path: Path, load) -> Reference | None:
    """The reference of `model.reference` ('initial': `policy_path`, the policy the run starts
    from, also on --resume), placed like the policy; None when `algo.kl_coef` is 0.
    `load(path)` -> model: the trainer's loader (one-line errors)."""
    if recipe.algo.kl_coef <= 0:
        return None
    if strategy.kind == "deepspeed" and strategy.sharded:
        raise HapoError("algo.kl_coef > 0 under DeepSpeed ZeRO-3: the reference model is not "
                        "sharded there yet; use FSDP2 (recipes/accelerate/fsdp.yaml) or ZeRO-2, "
                        "or set algo.kl_coef=0")
    from .strategy import _env_true, apply_fsdp2, compute_autocast

    source = policy_path if recipe.model.reference == "initial" else Path(recipe.model.reference)
    with strategy.loading():
        model = load(source)
    model.requires_grad_(False)
    model.eval()
    device = strategy.accelerator.device
    if strategy.kind == "fsdp2":
        model = apply_fsdp2(
            model, strategy.precision, device,
            reshard_after_forward=_env_true("FSDP_RESHARD_AFTER_FORWARD", "true"),
            offload=_env_true("FSDP_OFFLOAD_PARAMS"),
        )

        autocast = nullcontext  # fully_shard's MixedPrecisionPolicy sets the compute dtype
    else:
        model.to(device)

        def autocast():  # the policy's forward runs under accelerate's autocast: so does this
            return compute_autocast(strategy.precision, device)
    return Reference(model, recipe, device, autocast)


__all__ = ["Reference", "build_reference"]
