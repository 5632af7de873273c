"""Stage 2: the old policy's log-probs of the sampled tokens and their untempered entropy,
(B, T), without gradients; engines that could not record the per-token temperature at decode
time (vLLM) get it here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..rollout.base import decode_stats_from_entropy
from .batch import TrainBatch
from .forward import response_logprobs
from .oldlogp import reuse_behaviour_logp

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..rollout.base import RolloutEngine
    from .strategy import Strategy


def policy_temperature(recipe: Recipe, batch: TrainBatch, rows, device):
    """Temperature the learner scores rows at: the stored T_t ('rollout') or T ('base')."""
    if recipe.algo.policy_temperature == "rollout":
        return batch.temperature[rows].to(device)
    return recipe.rollout.temperature


def old_policy_scores(recipe: Recipe, model, batch: TrainBatch, stats_used, device,
                      micros: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(old log-probs at the policy temperature, untempered entropy), both (B, T) on the CPU.

    One untempered pass gives the entropy (and the log-probs when the policy temperature is
    1). Engines that cannot record T_t at decode time (vLLM) get it here, from the learner's
    entropy and the stats the rollout used; then a tempered pass gives the log-probs.
    `micros`: the row indices of each forward, the update's grouping (an empty one is a
    stand-in forward that keeps this rank in step with the others); None: consecutive
    `train.micro_batch_size` rows."""
    r = recipe
    B, T = batch.response_ids.shape
    if micros is None:
        mb = r.train.micro_batch_size
        micros = [torch.arange(s, min(s + mb, B)) for s in range(0, B, mb)]

    def run(temp_of) -> tuple[Tensor, Tensor]:
        logp, ent = torch.zeros(B, T), torch.zeros(B, T)
        with torch.no_grad():
            for rows in micros:
                stand_in = rows.numel() == 0
                run_rows = torch.tensor([0]) if stand_in else rows
                lp, en = response_logprobs(
                    model, batch.input_ids[run_rows].to(device),
                    batch.attention_mask[run_rows].to(device), T, temp_of(run_rows),
                    fused=r.train.fused_logprobs, chunk_size=r.train.logprob_chunk_size,
                    packed=r.train.packing,
                )
                assert en is not None  # entropy=True, the default
                if not stand_in:
                    logp[rows], ent[rows] = lp.float().cpu(), en.float().cpu()
        return logp, ent

    logp1, entropy = run(lambda rows: None)
    entropy = entropy.masked_fill(~batch.mask, 0.0)
    if not batch.decode_stats:
        batch.rollout_entropy, batch.temperature = decode_stats_from_entropy(
            entropy, batch.mask, r.rollout.temperature,
            r.algo.tau if r.algo.adaptive_temperature else 0.0, stats_used, pad_temperature=1.0,
        )
        batch.decode_stats = True
    if r.algo.policy_temperature == "base" and r.rollout.temperature == 1.0:
        return logp1, entropy
    logp, _ = run(lambda rows: policy_temperature(r, batch, rows, device))
    return logp, entropy


def score_old_policy(recipe: Recipe, model, strategy: Strategy, engine: RolloutEngine, batch: TrainBatch, stats_used, device,
                     micros: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(old log-probs, entropy), (B, T): the HF engine's behaviour log-probs when it sampled
    with these weights at the policy temperature (`oldlogp.py` lists the conditions), else a
    scoring pass (`old_policy_scores`)."""
    reused = reuse_behaviour_logp(recipe, strategy, engine, batch)
    return reused if reused is not None else old_policy_scores(recipe, model, batch,
                                                               stats_used, device, micros)
