"""Stage 1 of a training step: sample responses, score them, and (DAPO's dynamic sampling)
keep only groups whose rewards differ, drawing more generation batches until every rank has
its share of groups or the budget runs out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from analysis import schema

from ..errors import HapoError
from ..rewards import overlong_penalty, score_responses
from ..rewards.custom import mean_metrics, reward_set
from ..rollout import SamplingSpec
from .batch import TrainBatch, build_train_batch, concat_batches, mixed_groups
from .ranks import Ranks

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..rollout.base import RolloutEngine


class DynamicSamplingExhausted(RuntimeError):
    """train.dynamic_sampling.on_exhausted=raise and the batch could not be filled (DAPO)."""


def shard_indices(prompts: int, mini_batch: int, world: int, rank: int) -> list[int]:
    """Global prompt indices of `rank`: from every mini-batch of `mini_batch` prompts, its
    contiguous 1/world slice. Rank-local mini-batch m of all ranks together is then exactly
    global mini-batch m, so DDP over `world` ranks takes the same optimizer steps as one
    process. Needs mini_batch % world == 0."""
    if mini_batch % world:
        raise HapoError(
            f"train.mini_batch_prompts={mini_batch} must be a multiple of the number of "
            f"processes ({world})"
        )
    local = mini_batch // world
    return [m + rank * local + i for m in range(0, prompts, mini_batch) for i in range(local)]


def rollout_seed(seed: int, step: int, gen_batch: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + gen_batch * 101) % (2**31 - 1)


def generate_scored(recipe: Recipe, engine: RolloutEngine, tokenizer, examples, spec, stats, seed: int,
                    prompt_offset: list[int], pad_id: int,
                    reward_log: _RewardLog | None = None) -> TrainBatch:
    """One generation batch: sample `spec.n` responses per prompt, decode, score (with
    `data.rewards` when set: the per-reward values go to `reward_log`)."""
    out = engine.generate([list(e.prompt_ids) for e in examples], spec, stats, seed=seed,
                          prompt_offset=prompt_offset).to("cpu")
    texts = out.decode(tokenizer)
    per_response = [examples[i] for i in out.prompt_index.tolist()]
    if not recipe.data.rewards:
        scores, acc = score_responses(
            per_response, texts, out.response_len, recipe.rollout.max_new_tokens,
            recipe.train.overlong, incorrect_score=recipe.train.incorrect_score,
        )
        return build_train_batch(examples, out, scores, acc, texts, pad_id)

    got = reward_set(recipe.data, recipe.train.incorrect_score).score(per_response, texts)
    scores, ov = got.total, recipe.train.overlong
    if ov.enabled:
        scores = scores + overlong_penalty(out.response_len, recipe.rollout.max_new_tokens,
                                           ov.buffer_len, ov.penalty)
    if reward_log is not None:
        reward_log.parts.append(got.parts)
        reward_log.errors.append(got.errors)
    return build_train_batch(examples, out, scores, got.acc, texts, pad_id)


@dataclass
class _RewardLog:
    """data.rewards' per-reward values of the generation batches of one step."""

    parts: list[dict[str, Tensor]] = field(default_factory=list)
    errors: list[dict[str, int]] = field(default_factory=list)


@dataclass
class _Kept:
    """What dynamic sampling has kept so far, and what it saw."""

    batches: list[TrainBatch] = field(default_factory=list)
    groups: int = 0
    seen_groups: int = 0
    seen_mixed: int = 0
    acc: list[Tensor] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)

    def add(self, batch: TrainBatch, metric: str, keep_all: bool) -> None:
        """Record `batch`; keep its groups whose `metric` (acc or score) differs, or all."""
        self.acc.append(batch.acc)
        self.scores.append(batch.scores)
        mixed = mixed_groups(batch.acc if metric == "acc" else batch.scores, batch.group_ids)
        self.seen_groups += len(mixed)
        self.seen_mixed += int(mixed.sum())
        if keep_all:
            self.batches.append(batch)
            self.groups += batch.num_groups
            return
        keep = torch.nonzero(mixed).flatten().tolist()
        if keep:
            self.batches.append(batch.select_groups(keep))
            self.groups += len(keep)


def sample_batch(recipe: Recipe, engine: RolloutEngine, tokenizer, stream, ranks: Ranks, step: int, stats,
                 pad_id: int) -> tuple[TrainBatch | None, dict[str, float]]:
    """This rank's training groups of `step` (None when no group was kept) and the rollout
    metrics. Every rank trains the same number of groups: the smallest rank's count."""
    r = recipe
    ds = r.train.dynamic_sampling
    per_rank = r.train.prompts_per_step // ranks.world
    spec = SamplingSpec.for_training(r.rollout, r.algo)
    mine = shard_indices(r.train.prompts_per_step, r.train.mini_batch_prompts, ranks.world,
                         ranks.rank)
    kept = _Kept()
    reward_log = _RewardLog()
    gen_batches = 0
    while True:
        gen_batches += 1
        full = stream.next_batch(r.train.prompts_per_step,
                                 refill=gen_batches > 1 and ds.refill == "independent")
        batch = generate_scored(
            r, engine, tokenizer, [full[i] for i in mine], spec, stats,
            seed=rollout_seed(r.seed, step, gen_batches),
            prompt_offset=mine,  # global indices: the same samples however prompts are sharded
            pad_id=pad_id, reward_log=reward_log,
        )
        kept.add(batch, ds.metric, keep_all=not ds.enabled)
        # all ranks vote: stop once every rank has its share
        need_more = torch.tensor(float(kept.groups < per_rank))
        if not ds.enabled or float(ranks.sum(need_more)) == 0:
            break
        if ds.max_num_gen_batches and gen_batches >= ds.max_num_gen_batches:
            break
    n_mine = min(kept.groups, per_rank)
    n_use = int(ranks.min(torch.tensor(float(n_mine))))
    if ds.enabled and ds.on_exhausted == "raise" and n_use < per_rank:
        raise DynamicSamplingExhausted(
            f"dynamic sampling kept {n_use} of {per_rank} groups per rank after "
            f"{gen_batches} generation batches (train.dynamic_sampling.max_num_gen_batches="
            f"{ds.max_num_gen_batches}); the data may be too easy or too hard "
            "(on_exhausted=partial trains on what was kept)"
        )
    info = {
        schema.GEN_BATCHES: float(gen_batches),
        schema.REFILL_BATCHES: float(gen_batches - 1),
        schema.PARTIAL_BATCH: float(n_use < per_rank),
        # groups this rank kept beyond the smallest rank's count, dropped so ranks match
        schema.TRIMMED_GROUPS: ranks.count(n_mine - n_use),
        schema.FILL_RATE: n_use / per_rank,
        schema.MIXED_GROUP_FRAC: ranks.count(kept.seen_mixed)
        / max(ranks.count(kept.seen_groups), 1.0),
        schema.REWARD_ALL_ACC: float(ranks.cat(torch.cat(kept.acc)).mean()),
        schema.REWARD_ALL_MEAN: float(ranks.cat(torch.cat(kept.scores)).mean()),
    }
    if r.data.rewards:
        info.update(mean_metrics(reward_log.parts, reward_log.errors, ranks))
    if n_use == 0:
        return None, info
    batch = concat_batches(kept.batches, pad_id)
    return batch.select_groups(list(range(n_use))), info
