"""Stage 4: the PPO update. Epochs over mini-batches (one optimizer step each) of
micro-batches (one forward/backward each); C redistributes advantages from the current ratio;
the loss is the baseline's (`baseline.loss`) plus the KL and entropy terms (`regularisers`). Returns the update's metrics and, per token, the last ratio
and the advantage the loss saw (for the token rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from analysis import schema

from .. import algo
from .batch import TrainBatch
from .forward import response_logprobs, unwrap
from .microbatch import plan_micro_batches
from .reduce import MetricSums
from .scoring import policy_temperature
from .targets import Targets

if TYPE_CHECKING:
    from ..baselines.base import Baseline
    from ..recipe import Recipe
    from .ranks import Ranks
    from .strategy import Strategy


class NonFiniteError(RuntimeError):
    pass


def mini_batches(B: int, mini_batch_prompts: int, n: int, micro_batch_size: int, world: int
                 ) -> list[tuple[slice, list[slice]]]:
    """(mini-batch rows, its micro-batch row slices) over this rank's B responses: one
    optimizer step per mini-batch, one forward/backward per micro-batch."""
    mini = (mini_batch_prompts // world) * n
    micro = min(micro_batch_size, mini)
    out = []
    for m0 in range(0, B, mini):
        m1 = min(m0 + mini, B)
        out.append((slice(m0, m1), [slice(s, min(s + micro, m1)) for s in range(m0, m1, micro)]))
    return out


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    ratio: Tensor  # (B, T) importance ratio of the last epoch
    adv_c: Tensor  # (B, T) advantage the loss saw (after C and TIS)


def _result(sums: dict[str, float], weights: dict[str, float], ranks: Ranks, optimizer_steps: int
            ) -> dict[str, float]:
    """The update's loss metrics over ranks: token-weighted means, sums, and the mean loss
    per optimizer step."""
    sums, weights = ranks.sum_dict(sums), ranks.sum_dict(weights)
    out: dict[str, float] = {}
    for k, v in sums.items():
        if k in weights:
            out[k] = v / max(weights[k], 1e-12)
        elif k == schema.PG_LOSS:
            out[k] = v / max(optimizer_steps, 1)
        else:
            out[k] = v
    return out


class Updater:
    """Runs the PPO epochs of one training step with the learner's model and optimizer."""

    def __init__(self, recipe: Recipe, model, optimizer, scheduler, strategy: Strategy,
                 ranks: Ranks, baseline: Baseline, on_first_step=None) -> None:
        self.recipe, self.model, self.optimizer, self.scheduler = recipe, model, optimizer, scheduler
        self.strategy, self.ranks, self.baseline = strategy, ranks, baseline
        self.on_first_step = on_first_step  # called once optimizer state exists

    def mini_batches(self, B: int) -> list[tuple[slice, list[slice]]]:
        """Mini-batches of `train.micro_batch_size`-row micro-batches (the grouping the
        released code's per-micro-batch entropy stats use, whatever the update runs)."""
        t = self.recipe.train
        return mini_batches(B, t.mini_batch_prompts, self.recipe.rollout.n, t.micro_batch_size,
                            self.ranks.world)

    def plan(self, batch: TrainBatch) -> list[tuple[slice, list[Tensor]]]:
        """The update's (mini-batch rows, its micro-batches' row indices): by count, or by
        `train.max_tokens_per_micro_batch` (the same number of micro-batches on every rank)."""
        t = self.recipe.train
        minis = [m for m, _ in self.mini_batches(len(batch.scores))]
        tokens = batch.attention_mask.sum(-1)  # (B,) prompt + response tokens

        def max_over_ranks(counts: list[int]) -> list[int]:
            if self.ranks.world == 1:
                return counts
            return [int(c) for c in self.ranks.max(torch.tensor(counts, dtype=torch.long))]

        micros = plan_micro_batches(tokens, minis, t.micro_batch_size,
                                    t.max_tokens_per_micro_batch, max_over_ranks)
        return list(zip(minis, micros))

    def normalizer(self, norm_mask: Tensor) -> float:
        """The mini-batch's global loss denominator, the baseline's (tokens for token-mean,
        sequences otherwise), summed over ranks."""
        local = self.baseline.local_normalizer(norm_mask, self.recipe)
        return float(self.ranks.sum(local.float()))

    def micro_step(self, batch: TrainBatch, rows: Tensor, old_logp: Tensor, tg: Targets,
                   normalizer: float, *, weight: float = 1.0):
        """Forward and backward of one micro-batch (`rows`: row indices): (ratio, advantage
        after C, loss metrics, loss mask). `weight` 0: a stand-in micro-batch that only keeps
        this rank in step with the others' collectives (its gradient is zero)."""
        r, a, dev = self.recipe, self.recipe.algo, self.ranks.device
        T = batch.response_ids.shape[1]
        logp, ent = response_logprobs(
            self.model, batch.input_ids[rows].to(dev), batch.attention_mask[rows].to(dev), T,
            policy_temperature(r, batch, rows, dev), fused=r.train.fused_logprobs,
            chunk_size=r.train.logprob_chunk_size, entropy=a.entropy_coef > 0,
            packed=r.train.packing,
        )
        old = old_logp[rows].to(dev)
        loss_mask = tg.loss_mask[rows].to(dev)
        h = tg.h[rows].to(dev)
        eps_low, eps_high = tg.eps_low[rows].to(dev), tg.eps_high[rows].to(dev)
        adv = tg.adv.adv[rows].to(dev)
        ratio = algo.importance_ratio(logp.detach(), old)
        adv_c = (algo.redistribute_advantages(adv, h, ratio, eps_low, eps_high, beta=a.beta)
                 if a.redistribute else adv)
        if tg.tis is not None:
            adv_c = adv_c * tg.tis[rows].to(dev)
        loss, m = self.baseline.loss(logp, old, adv_c, loss_mask, eps_low, eps_high, a,
                                     normalizer=normalizer, h=h, adv_before=adv)
        if tg.ref_logp is not None or a.entropy_coef > 0:
            loss = loss + self.regularisers(logp, ent, tg, rows, loss_mask, normalizer, m)
        if not torch.isfinite(loss) and r.train.nonfinite_grad == "abort":
            raise NonFiniteError(
                f"non-finite loss at micro-batch rows {rows.tolist()[:8]}: "
                f"logp finite={bool(torch.isfinite(logp[loss_mask]).all())}, "
                f"adv finite={bool(torch.isfinite(adv_c[loss_mask]).all())}; "
                "last good checkpoint kept"
            )
        self.strategy.backward(loss * (self.ranks.world * weight))
        return ratio, adv_c, m, loss_mask

    def regularisers(self, logp: Tensor, ent: Tensor | None, tg: Targets, rows: Tensor,
                     loss_mask: Tensor, normalizer: float, m: dict[str, Tensor]) -> Tensor:
        """kl_coef x KL(pi || pi_ref) - entropy_coef x entropy, each per token aggregated like
        the policy loss (same aggregation and normaliser); their means go into `m`."""
        a, dev = self.recipe.algo, logp.device
        agg = self.baseline.loss_agg(a)
        n = loss_mask.sum().clamp_min(1)
        extra = torch.zeros((), device=dev)
        if tg.ref_logp is not None:
            kl = algo.kl_penalty(logp, tg.ref_logp[rows].to(dev), a.kl_estimator)  # (B, T)
            extra = extra + a.kl_coef * algo.aggregate(kl, loss_mask, agg, normalizer)
            m[schema.KL] = kl.detach().masked_fill(~loss_mask, 0.0).sum() / n
        if a.entropy_coef > 0:
            assert ent is not None  # the forward computes it when entropy_coef > 0
            extra = extra - a.entropy_coef * algo.aggregate(ent, loss_mask, agg, normalizer)
            m[schema.ENTROPY_BONUS] = ent.detach().masked_fill(~loss_mask, 0.0).sum() / n
        return extra

    def optimizer_step(self, n_done: int) -> float | None:
        """Clip, step, zero; the gradient norm, or None when a non-finite step was skipped."""
        t = self.recipe.train
        gn = self.strategy.clip_and_step(t.grad_clip)  # steps only if finite
        if not math.isfinite(gn):
            self.optimizer.zero_grad(set_to_none=True)
            if t.nonfinite_grad == "skip":  # verl dp_actor: skip the update
                return None
            raise NonFiniteError(
                f"non-finite gradient norm ({gn}) at optimizer step {n_done + 1}; "
                "last good checkpoint kept"
            )
        if t.warmup_unit == "optimizer":
            self.scheduler.step()
        if self.on_first_step is not None:
            self.on_first_step()
            self.on_first_step = None
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def run(self, batch: TrainBatch, old_logp: Tensor, tg: Targets,
            plan: list[tuple[slice, list[Tensor]]] | None = None) -> UpdateResult:
        """The PPO epochs over `plan` (default: `self.plan(batch)`)."""
        if plan is None:
            plan = self.plan(batch)
        unwrap(self.model).train()
        B, T = batch.response_ids.shape
        sums = MetricSums()  # on the device, read once per update (reduce.py)
        ratio_all = torch.ones(B, T)
        adv_c_all = tg.adv.adv.clone()
        grad_norms: list[float] = []
        n_skipped = 0
        for _epoch in range(self.recipe.train.ppo_epochs):
            for m_rows, micros in plan:
                normalizer = self.normalizer(tg.norm_mask[m_rows])
                if normalizer == 0:
                    continue
                for i, rows in enumerate(micros):
                    stand_in = rows.numel() == 0  # more micro-batches on another rank
                    run_rows = torch.tensor([m_rows.start]) if stand_in else rows
                    # gradients reduced (DeepSpeed: the engine steps) on the last micro-batch only
                    with self.strategy.micro_batch(i, len(micros)):
                        ratio, adv_c, m, loss_mask = self.micro_step(
                            batch, run_rows, old_logp, tg, normalizer,
                            weight=0.0 if stand_in else 1.0)
                    if stand_in:
                        continue
                    ratio_all[rows] = ratio.cpu()
                    adv_c_all[rows] = adv_c.detach().cpu()
                    sums.add(m, loss_mask)
                gn = self.optimizer_step(len(grad_norms))
                if gn is None:
                    n_skipped += 1
                else:
                    grad_norms.append(gn)
        metrics = _result(*sums.totals(), self.ranks, len(grad_norms))
        metrics[schema.GRAD_NORM] = sum(grad_norms) / max(len(grad_norms), 1)
        metrics[schema.LR] = float(self.scheduler.get_last_lr()[0])
        metrics[schema.OPTIMIZER_STEPS] = float(len(grad_norms))
        metrics[schema.SKIPPED_STEPS] = float(n_skipped)
        unwrap(self.model).eval()
        return UpdateResult(metrics, ratio_all, adv_c_all)
