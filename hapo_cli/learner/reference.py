"""The frozen reference policy of the KL penalty (`algo.kl_coef` > 0, `model.reference`).

Loaded once, never trained, placed like the policy: on the learner's device (single, DDP,
ZeRO-1/2: a plain module, no gradient, nothing to synchronise), sharded with the policy's own
`fully_shard` settings under FSDP2, or partitioned by a second DeepSpeed engine in ZeRO-3
inference mode (no optimizer; as TRL's and OpenRLHF's reference models) under ZeRO-3. Sharded,
every rank runs each forward: the micro-batches, stand-ins included, are the old-policy pass's. It scores the batch's response tokens at the policy
temperature through `response_logprobs`, with the same `packed` flag and fused head as the policy.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from .batch import TrainBatch
from .forward import response_logprobs
from .fsdp2 import apply_fsdp2
from .precision import compute_autocast, env_true
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

    source = policy_path if recipe.model.reference == "initial" else Path(recipe.model.reference)
    with strategy.loading():
        model = load(source)
    model.requires_grad_(False)
    model.eval()
    device = strategy.accelerator.device
    if strategy.kind == "fsdp2":
        model = apply_fsdp2(
            model, strategy.precision, device,
            reshard_after_forward=env_true("FSDP_RESHARD_AFTER_FORWARD", "true"),
            offload=env_true("FSDP_OFFLOAD_PARAMS"),
        )

        autocast = nullcontext  # fully_shard's MixedPrecisionPolicy sets the compute dtype
    elif strategy.kind == "deepspeed" and strategy.sharded:
        model = zero3_inference_engine(model, strategy.accelerator)
        autocast = nullcontext  # the engine's bf16/fp16 section sets the dtype, as the policy's
    else:
        model.to(device)

        def autocast():  # the policy's forward runs under accelerate's autocast: so does this
            return compute_autocast(strategy.precision, device)
    return Reference(model, recipe, device, autocast)


def zero3_inference_engine(model, accelerator):
    """`model` as a DeepSpeed ZeRO-3 engine without an optimizer: its parameters partitioned
    over the ranks like the policy's (each rank keeps 1/world, gathered layer by layer in each
    forward), nothing to train. The config is the policy's (same stage, dtype, offload and
    batch sizes), less the optimizer and scheduler sections. Under accelerate's
    `zero3_init_flag` the loader already built the model partitioned (`zero.Init`); the engine
    adds the gather/release hooks of the forward (DeepSpeed's ZeRO-3 inference mode: stage 3
    and no optimizer gives a `DeepSpeedZeRoOffload`, not a ZeRO optimizer)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for section in ("optimizer", "scheduler"):
        config.pop(section, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:  # `sharded` said stage 3; the copy must say so too
        raise AssertionError(f"ZeRO-3 reference: zero_optimization.stage={zero.get('stage')!r}")
    zero.pop("offload_optimizer", None)  # no optimizer state to offload
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


__all__ = ["Reference", "build_reference", "zero3_inference_engine"]
