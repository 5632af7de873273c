"""The training loop. One step, stage by stage:

    sample (+ dynamic sampling) -> old log-probs and entropy -> targets (h, advantages, masks,
    clip bounds, TIS) -> PPO update -> metrics -> token rows -> weights to the engine

Each stage is a module of this package with one job; `Loop` holds the learner's objects and
calls them in order. The math lives in `hapo_cli.algo`, the baseline in `hapo_cli.baselines`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from analysis import schema

from .. import algo
from ..baselines import get_baseline
from ..evaluate import validation_metrics
from ..interrupts import interrupt_reason, stop_after_step, stop_requested
from ..progress import step_progress
from ..runlog import RunLog
from .checkpoint import fresh_temporary_dir, save_checkpoint, temporary_dir
from .forward import unwrap
from .ranks import Ranks
from .sampling import DynamicSamplingExhausted, sample_batch
from .scoring import score_old_policy
from .state import LoopState, TrainSummary
from .step_metrics import batch_metrics, critical_threshold
from .targets import compute_targets
from .token_rows import token_rows
from .update import NonFiniteError, Updater

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase

    from ..data.files import Example
    from ..recipe import Recipe
    from ..rollout.base import RolloutEngine
    from ..trackers import Trackers
    from .dcp_checkpoint import LoopCheckpoints
    from .reference import Reference
    from .strategy import Strategy
    from .streams import TrainStreams


def kl_old(old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str,
           ranks: Ranks) -> float:
    """Mean per-token KL estimate of the old policy to the reference over all ranks' valid
    tokens (0 at step 1 when the reference is the initial policy)."""
    kl = algo.kl_penalty(old_logp, ref_logp, estimator).masked_fill(~mask, 0.0)
    tot = ranks.sum(kl.sum().double())
    n = ranks.sum(mask.sum().double())
    return float(tot) / max(float(n), 1.0)


class Loop:
    """The learner's objects, built by `trainer.build_learner`, and the step loop over them."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: LRScheduler, engine: RolloutEngine,
                 tokenizer: PreTrainedTokenizerBase, stream: TrainStreams,
                 val_sets: dict[str, list[Example]], runlog: RunLog, run_dir: Path,
                 state: LoopState, *, strategy: Strategy, reference: Reference | None,
                 trackers: Trackers, saver: LoopCheckpoints | None):
        self.recipe, self.accelerator, self.model = recipe, accelerator, model
        self.optimizer, self.scheduler, self.engine = optimizer, scheduler, engine
        self.tokenizer, self.stream, self.val_sets = tokenizer, stream, val_sets
        self.runlog, self.run_dir, self.state = runlog, run_dir, state
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if isinstance(pad, int) else 0
        self.ranks = Ranks(accelerator)
        self.strategy = strategy
        self.reference = reference  # learner/reference.py: the KL's frozen policy, or None
        self.baseline = get_baseline(recipe.algo.baseline)
        self.updater = Updater(recipe, model, optimizer, scheduler, strategy, self.ranks,
                               self.baseline, on_first_step=self._describe_optimizer)
        self.trackers = trackers
        self.saver = saver  # under log.checkpoint_format=dcp (dcp_checkpoint.py), else None

    def _describe_optimizer(self) -> None:
        """Optimizer state exists after the first step: record its dtypes in the manifest."""
        self.runlog.update_manifest(**self.strategy.describe())

    # ---- one step ----
    def train_step(self, step: int) -> dict[str, Any]:
        r, a = self.recipe, self.recipe.algo
        t0 = time.perf_counter()
        unwrap(self.model).eval()
        stats_used = self.state.entropy_stats if a.adaptive_temperature else None
        batch, info = sample_batch(r, self.engine, self.tokenizer, self.stream, self.ranks, step,
                                   stats_used, self.pad_id)
        self.engine.sleep()  # vLLM: free KV cache / weights while the learner trains
        row: dict[str, Any] = {schema.STEP: step, **info,
                               schema.TIME_GEN: time.perf_counter() - t0}
        if batch is None:
            return {**row, schema.TIME_STEP: time.perf_counter() - t0, schema.SKIPPED: 1}

        t1 = time.perf_counter()
        plan = self.updater.plan(batch)  # micro-batches: the old-log-prob pass and the update
        micros = [rows for _, micros in plan for rows in micros]
        old_logp, entropy = score_old_policy(r, self.model, self.strategy, self.engine, batch,
                                             stats_used, self.ranks.device, micros)
        row[schema.TIME_OLD_LOGP] = time.perf_counter() - t1
        ref_logp = self._reference_logp(batch, micros, old_logp, row)  # KL's, or None
        micro_rows = [rows for _, micros in self.updater.mini_batches(len(batch.scores))
                      for rows in micros]
        targets = compute_targets(batch, old_logp, entropy, a, self.baseline, self.ranks,
                                  micro_rows, ref_logp)
        t2 = time.perf_counter()
        upd = self.updater.run(batch, old_logp, targets, plan)
        if r.train.warmup_unit == "training":  # verl: once per update_actor call
            self.scheduler.step()
        row[schema.TIME_TRAIN] = time.perf_counter() - t2

        self.state.entropy_stats = targets.stats  # A samples the next step with them
        if self.state.critical_threshold is None:
            self.state.critical_threshold = critical_threshold(entropy, batch.mask,
                                                               a.critical_quantile, self.ranks)
        row.update(upd.metrics)
        row.update(batch_metrics(batch, entropy, old_logp, targets,
                                 self.state.critical_threshold, self.ranks))
        row[schema.TIME_STEP] = time.perf_counter() - t0

        every = r.log.token_sample_every
        if every and (step % every == 0 or step == 1):
            self.runlog.write_tokens(step, token_rows(
                step, batch, entropy, targets, upd, self.tokenizer,
                r.log.token_sample_responses, r.seed))
        self.engine.sync_from(self.model, self.accelerator)  # HF on the learner's module: no-op
        return row

    def _reference_logp(self, batch, micros, old_logp, row: dict[str, Any]):
        """The KL's reference log-probs on the old pass's micro-batches (None without a
        reference); logs its time and the old policy's KL to it."""
        if self.reference is None:
            return None
        t0 = time.perf_counter()
        ref_logp = self.reference.score(batch, micros)
        row[schema.TIME_REF] = time.perf_counter() - t0
        row[schema.KL_OLD] = kl_old(old_logp, ref_logp, batch.mask,
                                    self.recipe.algo.kl_estimator, self.ranks)
        return ref_logp

    # ---- the run ----
    def run(self, progress: bool = True) -> TrainSummary:
        r = self.recipe
        main = self.accelerator.is_main_process
        status, message = "done", ""
        reason_kw: dict[str, str] = {}
        last_row: dict[str, Any] = {}
        # stop_after_step: SIGTERM/USR1/USR2 end the run after the step it is on, checkpointed
        with step_progress("train", r.train.max_steps, disable=not (progress and main)) as bar, \
                stop_after_step():
            task = bar.add_task("train", total=r.train.max_steps, completed=self.state.step,
                                info="")
            if self.state.step == 0 and r.eval.at_start and self.val_sets:
                self._log({schema.STEP: 0, **self._validate(0)})
            while self.state.step < r.train.max_steps:
                step = self.state.step + 1
                try:
                    row = self.train_step(step)
                except (NonFiniteError, DynamicSamplingExhausted) as exc:
                    status, message = "failed", str(exc)
                    self.runlog.log_metrics({schema.STEP: step, schema.ERROR: message})
                    break
                self.state.step = step
                last = step == r.train.max_steps
                if (r.eval.every and step % r.eval.every == 0) or last:
                    row.update(self._validate(step))
                self._log(row)
                saved = (r.log.checkpoint_every and step % r.log.checkpoint_every == 0) or last
                if saved:
                    self.checkpoint(step)
                last_row = row
                bar.update(task, completed=step, info=self._bar_info(row))
                reason = self._stop_reason()
                if reason and not last:
                    if not saved:
                        self.checkpoint(step)
                    status, reason_kw = "interrupted", {"reason": reason}
                    sig = interrupt_reason()  # None on a rank the signal did not reach
                    how = f"{reason}, {sig[1]}" if sig else reason
                    message = (f"interrupted at step {step} ({how}); checkpoint written; "
                               "continue with --resume")
                    break
        if self.saver is not None:  # the last checkpoint is on disk before the run says so
            self.saver.wait()
        self.runlog.finish(status, message=message or None, final_step=self.state.step,
                           **reason_kw)
        return TrainSummary(self.run_dir, status, self.state.step, self._final(last_row),
                            message, is_main=main)

    def _stop_reason(self) -> str | None:
        """A stop asked of any rank (a preemption signal), agreed on by all: every rank ends
        after the same step."""
        reason = stop_requested()
        if self.ranks.world > 1:
            asked = self.ranks.max(torch.tensor([1.0 if reason else 0.0]))
            reason = (reason or "preempted") if float(asked[0]) > 0 else None
        return reason

    def _log(self, row: dict[str, Any]) -> None:
        self.runlog.log_metrics(row)
        self.trackers.log(row)

    def _final(self, last_row: dict[str, Any]) -> dict[str, Any]:
        final = {k: last_row.get(k) for k in (schema.REWARD_ACC, schema.ENTROPY_MEAN)}
        for k, v in self.state.last_val.items():
            kind = (schema.parse_val_metric(k) or ("", ""))[1]
            if kind == "greedy":
                final["val_greedy"] = v
            elif kind.startswith("avg@"):
                final["val_avg"] = v
        return final

    def _bar_info(self, row: dict[str, Any]) -> str:
        parts = [f"{label} {row[key]:.3f}" for key, label in (
            (schema.REWARD_MEAN, "reward"), (schema.REWARD_ACC, "acc"),
            (schema.ENTROPY_MEAN, "entropy")) if key in row]
        greedy = [v for k, v in self.state.last_val.items()
                  if (schema.parse_val_metric(k) or ("", ""))[1] == "greedy"]
        return "  ".join(parts + [f"val {v:.3f}" for v in greedy[:1]])

    # ---- validation and checkpoints ----
    def _validate(self, step: int) -> dict[str, float]:
        unwrap(self.model).eval()
        out = validation_metrics(self.engine, self.tokenizer, self.val_sets, self.recipe, step,
                                 rank=self.ranks.rank, world=self.ranks.world)
        self.engine.sleep()
        self.state.last_val = out
        return out

    def checkpoint(self, step: int) -> None:
        if self.saver is not None:  # DCP: every rank writes its shards, asynchronously
            self.saver.save(self, step)
            return
        save_hf_checkpoint(self.strategy, self.model, self.optimizer, self.run_dir, step,
                           self.tokenizer, self.scheduler, self.stream, self.state,
                           keep=self.recipe.log.keep_checkpoints)


def save_hf_checkpoint(strategy, model, optimizer, run_dir: Path, step: int, tokenizer, scheduler,
                       stream, state, *, keep: int) -> None:
    """log.checkpoint_format=hf (and DeepSpeed ZeRO, LoRA): the HF folder + optimizer.pt written
    by the main process from the full model and optimizer state (collective: every rank calls
    it; DeepSpeed: each rank's ZeRO partition beside it)."""
    acc = strategy.accelerator
    acc.wait_for_everyone()
    # sharded strategies gather the full model and optimizer state on every rank first
    model_state = strategy.full_model_state()
    optim_state = strategy.optimizer_state()
    per_rank = strategy.ranks_write_optimizer
    if per_rank:  # DeepSpeed: each rank's ZeRO partition into the folder being written
        if acc.is_main_process:
            fresh_temporary_dir(run_dir, step)
        acc.wait_for_everyone()
        strategy.save_rank_optimizer(temporary_dir(run_dir, step))
        acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(
            run_dir, step, acc.unwrap_model(model), tokenizer,
            optimizer, scheduler, stream, state,
            keep=keep, model_state=model_state,
            optim_state=optim_state, ranks_wrote_optimizer=per_rank,
        )
    acc.wait_for_everyone()
