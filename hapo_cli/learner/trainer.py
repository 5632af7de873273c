"""The training loop: rollouts -> rewards -> dynamic sampling -> old log-probs, entropy stats ->
advantages (B) -> PPO epochs with C and D -> optimizer step -> metrics, token rows, checkpoints.

Runs on `accelerate.Accelerator` (one process on a laptop CPU, DDP/FSDP/DeepSpeed across GPUs).
The math lives in `hapo_cli.algo`; this module only moves tensors between the pieces.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if not torch.cuda.is_available():
    import os

    # DeepSpeed (when installed, accelerate imports it) otherwise warns on every run that it
    # "could not detect" an accelerator; on a machine without CUDA the CPU is the answer
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from analysis import schema

from .. import algo
from ..recipe import Recipe
from ..rollout.base import recompute_adaptive_temperature
from ..runlog import RunLog
from .batch import TrainBatch, build_train_batch, concat_batches, mixed_groups
from .checkpoint import load_trainer_state, save_checkpoint
from .forward import response_logprobs, unwrap
from .oldlogp import reuse_behaviour_logp
from .reduce import MetricSums
from .weights import check_engine_sharding


@dataclass
class TrainSummary:
    run_dir: Path
    status: str
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    message: str = ""
    is_main: bool = True

    def line(self) -> str:
        parts = [f"run {self.status}: {self.run_dir}", f"steps {self.steps}"]
        for k in ("val_greedy", "val_avg", "reward/acc", "actor/entropy_mean"):
            if k in self.final and self.final[k] is not None:
                parts.append(f"{k} {self.final[k]:.3f}")
        if self.message:
            parts.append(self.message)
        return " | ".join(parts)


class DynamicSamplingExhausted(RuntimeError):
    """train.dynamic_sampling.on_exhausted=raise and the batch could not be filled (DAPO)."""


class NonFiniteError(RuntimeError):
    pass


def run_dir_of(recipe: Recipe, output_dir: Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    return Path(recipe.log.output_dir) / (recipe.log.run_name or recipe.name)


def shard_indices(prompts: int, mini_batch: int, world: int, rank: int) -> list[int]:
    """Global prompt indices of `rank`: from every mini-batch of `mini_batch` prompts, its
    contiguous 1/world slice. Rank-local mini-batch m of all ranks together is then exactly
    global mini-batch m, so DDP over `world` ranks takes the same optimizer steps as one
    process. Needs mini_batch % world == 0."""
    if mini_batch % world:
        from ..errors import HapoError

        raise HapoError(
            f"train.mini_batch_prompts={mini_batch} must be a multiple of the number of "
            f"processes ({world})"
        )
    local = mini_batch // world
    return [m + rank * local + i for m in range(0, prompts, mini_batch) for i in range(local)]


def _rollout_seed(seed: int, step: int, gen_batch: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + gen_batch * 101) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    output_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainSummary:
    """Train per `recipe`, writing the run directory. Returns a summary (status done/failed)."""
    from accelerate.utils import set_seed

    from .strategy import Strategy, build_accelerator, resolve_precision

    run_dir = run_dir_of(recipe, output_dir)
    recipe_yaml = recipe.to_yaml()
    mode = RunLog.prepare(run_dir, recipe_yaml, resume=resume, overwrite=overwrite)
    from ..trackers import Trackers, check_trackers

    check_trackers(recipe.log.trackers)

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    # fp32 master weights and optimizer state; model.dtype / train.mixed_precision set the
    # compute dtype. The strategy (single, DDP, FSDP2, DeepSpeed) comes from `accelerate launch`.
    precision = resolve_precision(recipe.model.dtype, recipe.train.mixed_precision)
    accelerator, kind = build_accelerator(precision, project_dir=str(run_dir))
    strategy = Strategy(kind, accelerator, precision)
    set_seed(recipe.seed)

    from ..models import check_model_dir, load_policy, resolve_policy_path

    # Everything that can be validated is, before anything in the run directory changes:
    # data files, the model folder, the checkpoint to resume from, optimizer construction.
    _check_data_files(recipe)
    # the main process builds (or finds) the warm-up policy; the others then read it from the
    # cache, never racing the build
    with accelerator.main_process_first(), \
            _warmup_bar(progress and accelerator.is_main_process) as on_step:
        policy_path = resolve_policy_path(recipe.model, recipe.data, progress=on_step)
    from ..data import build_val_sets
    from .resume import usable_checkpoint
    from .streams import build_streams

    ckpt, skipped = usable_checkpoint(run_dir) if mode == "resume" else (None, [])
    if skipped and ckpt is None:  # restarting would discard the run's rows: refuse instead
        from ..errors import RunDirError

        raise RunDirError(
            f"{run_dir}: no checkpoint loads ({'; '.join(skipped)}); nothing was changed; "
            "pass --overwrite to start the run again"
        )
    for line in skipped:
        _warn(accelerator, f"--resume: skipping unreadable checkpoint {line}")
    if skipped:
        _warn(accelerator, f"--resume: continuing from {ckpt.name}")
    elif mode == "resume" and ckpt is None:
        _warn(accelerator, "--resume: no checkpoint yet; the run restarts from step 0")
    source = ckpt or policy_path
    check_model_dir(source)
    model, tokenizer = _load(load_policy, source, strategy.load_dtype)
    stream = build_streams(recipe.data, tokenizer, recipe.seed)
    val_sets = build_val_sets(recipe.data, tokenizer)

    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    t = recipe.train
    model, optimizer = strategy.prepare(
        model,
        lambda params: torch.optim.AdamW(params, lr=t.lr, betas=t.betas,
                                         weight_decay=t.weight_decay),
        engine=recipe.rollout.engine, micro_batch_size=t.micro_batch_size, grad_clip=t.grad_clip,
    )
    from .schedule import build_lr_scheduler

    scheduler = build_lr_scheduler(optimizer, t)
    # The scheduler stays unprepared: accelerate would step it once per process per call,
    # which makes the warm-up depend on the number of processes. We step it per optimizer step
    # or per training step (train.warmup_unit).

    from ..rollout import build_engine

    check_engine_sharding(recipe.rollout.engine, accelerator, strategy)

    # vLLM loads from disk: on --resume the checkpoint, the weights the learner just loaded
    # (the warm-up policy there would make the first resumed step sample off-policy)
    engine_path = ckpt or policy_path
    engine = build_engine(recipe.rollout, strategy.engine_model(), tokenizer, str(engine_path),
                          accelerator,
                          max_prompt_length=recipe.data.max_prompt_length,
                          dtype=recipe.model.dtype, seed=recipe.seed)

    state = LoopState()
    if ckpt is not None:
        state = _load(load_trainer_state, ckpt, strategy, scheduler, stream)

    runlog = RunLog(run_dir, enabled=accelerator.is_main_process)
    runlog.start(
        recipe_yaml,
        {
            "run_name": run_dir.name,
            "seed": recipe.seed,
            "components": recipe.components,
            "algo": recipe.algo.baseline,
            "policy_path": str(policy_path),
            "world_size": accelerator.num_processes,
            **({"resumed_from": ckpt.name} if ckpt is not None else {}),
            **strategy.describe(),
        },
        mode=mode,
    )
    # A resume keeps the rows up to its checkpoint; without one it starts again from step 0,
    # so no row survives (the step-0 validation row would otherwise be logged twice).
    if mode == "resume":
        runlog.truncate_metrics(state.step if ckpt is not None else -1)
    trackers = Trackers(recipe.log.trackers, run_dir, enabled=accelerator.is_main_process)

    loop = Loop(recipe, accelerator, model, optimizer, scheduler, engine, tokenizer, stream,
                val_sets, runlog, run_dir, state, strategy=strategy)
    loop.trackers = trackers
    final_status = "failed"
    from ..interrupts import interrupt_once

    try:
        # One interrupt: a second signal (Ctrl-C reaches the whole process group, then an
        # ablation also asks its children to stop) cannot cut the `interrupted` manifest short.
        with interrupt_once():
            try:
                trackers.start(recipe.model_dump(mode="json"),
                               runlog.manifest.get("trackers") if mode == "resume" else None)
                if trackers.ids:
                    runlog.update_manifest(trackers=trackers.ids)
                summary = loop.run(progress=progress)
                final_status = summary.status
                return summary
            except KeyboardInterrupt:
                final_status = "interrupted"
                message = f"interrupted at step {loop.state.step}; continue with --resume"
                _finish_quietly(runlog, "interrupted", message, loop.state.step)
                return TrainSummary(run_dir, "interrupted", loop.state.step, message=message,
                                    is_main=accelerator.is_main_process)
            except BaseException as exc:
                from ..errors import RunFailed, first_line
                from ..runlog import disk_full, os_error_line

                _remove_temporaries(run_dir)  # first: a half-written checkpoint may hold space
                if isinstance(exc, OSError) or disk_full(exc, run_dir):
                    # disk full, read-only filesystem, a folder removed under us: one line
                    if isinstance(exc, OSError):
                        message = os_error_line(exc)
                    else:
                        message = f"{run_dir}: no space left on device"
                    _finish_quietly(runlog, "failed", message, loop.state.step)
                    raise RunFailed(f"run failed after step {loop.state.step}: {message}") from None
                _finish_quietly(runlog, "failed", f"{type(exc).__name__}: {first_line(exc)}",
                                loop.state.step)
                raise
    finally:
        trackers.close(final_status)
        runlog.unlock()


def _warn(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def _load(fn, path, *args):
    """Call a loader; any failure is one line naming the folder (ModelError, exit 2)."""
    from ..errors import HapoError, first_line
    from ..models import ModelError

    try:
        return fn(path, *args)
    except HapoError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError, torch pickle errors
        raise ModelError(f"{path}: cannot be loaded ({type(exc).__name__}: {first_line(exc)})") from None


def _finish_quietly(runlog: RunLog, status: str, message: str, step: int) -> None:
    """Mark the manifest; if even that write fails (disk still full), the run is no worse off."""
    try:
        runlog.finish(status, message=message, final_step=step)
    except OSError:
        pass


def _remove_temporaries(run_dir: Path) -> None:
    """Half-written checkpoint folders of a failed save (the run directory's own files are
    written by runlog, whose writers remove their temporary file when a write fails)."""
    import shutil

    ckpts = Path(run_dir) / schema.CHECKPOINTS_DIR
    for tmp in ckpts.glob(".step-*.tmp") if ckpts.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_data_files(recipe: Recipe) -> None:
    from ..errors import HapoError

    if recipe.data.source != "files":
        return
    for field_name in ("train_files", "val_files"):
        for f in getattr(recipe.data, field_name):
            if not Path(f).is_file():
                raise HapoError(f"data.{field_name}: {f}: no such file (expected parquet or jsonl)")


@contextmanager
def _warmup_bar(show: bool):
    """A callback (step, total) driving a rich bar for the supervised warm-up, if one runs."""
    from ..progress import step_progress

    bar = None
    task = None

    def on_step(step: int, total: int) -> None:
        nonlocal task, bar
        if task is None:
            bar = step_progress("warm-up", total, disable=not show)
            bar.start()
            task = bar.add_task("warm-up", total=total, info="")
        bar.update(task, completed=step, total=total)

    try:
        yield on_step
    finally:
        if bar is not None:
            bar.stop()


@dataclass
class LoopState:
    step: int = 0
    entropy_stats: algo.EntropyStats | None = None
    critical_threshold: float | None = None
    last_val: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class Loop:
    def __init__(self, recipe, accelerator, model, optimizer, scheduler, engine, tokenizer, stream,
                 val_sets, runlog, run_dir, state, strategy=None):
        self.r = recipe
        self.acc = accelerator
        self.model = model
        self.opt = optimizer
        self.sched = scheduler
        self.engine = engine
        self.tok = tokenizer
        self.stream = stream
        self.val_sets = val_sets
        self.log = runlog
        self.run_dir = run_dir
        self.state = state
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        if strategy is None:
            from .strategy import Precision, Strategy

            strategy = Strategy("ddp" if self.world > 1 else "single", accelerator,
                                Precision(torch.float32))
            strategy.model, strategy.optimizer = model, optimizer
        self.strategy = strategy
        self._described = False
        from ..trackers import Trackers

        self.trackers = Trackers([], run_dir)  # train() sets the recipe's

    # ---- distributed helpers ----
    def _sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return self.acc.reduce(x.to(self.device), reduction="sum").cpu()

    def _cat(self, x: Tensor) -> Tensor:
        """Concatenate a 1-D tensor over ranks (rank order), returned on the CPU."""
        if self.world == 1:
            return x
        from ..algo.distributed import all_gather_varlen

        return all_gather_varlen(x.to(self.device)).cpu()

    def _sum_dict(self, d: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not d:
            return d
        keys = sorted(d)
        v = self._sum(torch.tensor([d[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, v.tolist()))

    def _min(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        g = self.acc.gather(x.to(self.device).reshape(1))
        return g.min().cpu()

    # ---- main ----
    def run(self, progress: bool = True) -> TrainSummary:
        r = self.r
        from ..progress import step_progress

        show = progress and self.acc.is_main_process

        bar = step_progress("train", r.train.max_steps, disable=not show)
        status, message = "done", ""
        last_row: dict[str, Any] = {}
        with bar:
            task = bar.add_task("train", total=r.train.max_steps, completed=self.state.step, info="")
            if self.state.step == 0 and r.eval.at_start and self.val_sets:
                val = self.validate(0)
                self.log.log_metrics({"step": 0, **val})
                self.trackers.log({"step": 0, **val})
                self.state.last_val = val
            while self.state.step < r.train.max_steps:
                step = self.state.step + 1
                try:
                    row = self.train_step(step)
                except (NonFiniteError, DynamicSamplingExhausted) as exc:
                    status, message = "failed", str(exc)
                    self.log.log_metrics({"step": step, "error": message})
                    break
                self.state.step = step
                last_eval = step == r.train.max_steps
                if (r.eval.every and step % r.eval.every == 0) or last_eval:
                    val = self.validate(step)
                    row.update(val)
                    self.state.last_val = val
                self.log.log_metrics(row)
                self.trackers.log(row)
                if (r.log.checkpoint_every and step % r.log.checkpoint_every == 0) or last_eval:
                    self.checkpoint(step)
                last_row = row
                bar.update(task, completed=step, info=self._bar_info(row))
        final = {
            "reward/acc": last_row.get("reward/acc"),
            "actor/entropy_mean": last_row.get("actor/entropy_mean"),
        }
        for k, v in self.state.last_val.items():
            if k.endswith("/greedy"):
                final["val_greedy"] = v
            elif "/avg@" in k:
                final["val_avg"] = v
        self.log.finish(status, message=message or None, final_step=self.state.step)
        return TrainSummary(self.run_dir, status, self.state.step, final, message,
                            is_main=self.acc.is_main_process)

    def _bar_info(self, row: dict[str, Any]) -> str:
        parts = []
        for key, label in (("reward/mean", "reward"), ("reward/acc", "acc"),
                           ("actor/entropy_mean", "entropy")):
            if key in row:
                parts.append(f"{label} {row[key]:.3f}")
        for k, v in self.state.last_val.items():
            if k.endswith("/greedy"):
                parts.append(f"val {v:.3f}")
                break
        return "  ".join(parts)

    # ---- rollouts with dynamic sampling ----
    def collect(self, step: int) -> tuple[TrainBatch | None, dict[str, float]]:
        from ..rewards import score_responses
        from ..rollout import SamplingSpec

        r = self.r
        ds = r.train.dynamic_sampling
        per_rank = r.train.prompts_per_step // self.world
        spec = SamplingSpec(
            n=r.rollout.n,
            temperature=r.rollout.temperature,
            top_p=r.rollout.top_p,
            top_k=r.rollout.top_k,
            max_new_tokens=r.rollout.max_new_tokens,
            adaptive=r.algo.adaptive_temperature,
            tau=r.algo.tau,
        )
        stats = self.state.entropy_stats if r.algo.adaptive_temperature else None
        kept: list[TrainBatch] = []
        n_kept = 0
        gen_batches = 0
        all_groups = 0
        all_mixed = 0
        all_acc: list[Tensor] = []
        all_scores: list[Tensor] = []
        mine = shard_indices(r.train.prompts_per_step, r.train.mini_batch_prompts, self.world,
                             self.rank)
        while True:
            gen_batches += 1
            full = self.stream.next_batch(r.train.prompts_per_step,
                                          refill=gen_batches > 1 and ds.refill == "independent")
            examples = [full[i] for i in mine]
            out = self.engine.generate(
                [list(e.prompt_ids) for e in examples],
                spec,
                stats,
                seed=_rollout_seed(r.seed, step, gen_batches),
                prompt_offset=mine,  # global indices: the same samples however prompts are sharded
            ).to("cpu")
            texts = self.tok.batch_decode(
                [ids[m].tolist() for ids, m in zip(out.response_ids, out.response_mask.bool())],
                skip_special_tokens=True,
            )
            per_resp = [examples[i] for i in out.prompt_index.tolist()]
            scores, acc = score_responses(
                per_resp, texts, out.response_len, r.rollout.max_new_tokens, r.train.overlong,
                incorrect_score=r.train.incorrect_score,
            )
            batch = build_train_batch(examples, out, scores, acc, texts, self.pad_id)
            all_acc.append(batch.acc)
            all_scores.append(batch.scores)
            metric = batch.acc if ds.metric == "acc" else batch.scores
            mixed = mixed_groups(metric, batch.group_ids)
            all_groups += len(mixed)
            all_mixed += int(mixed.sum())
            if ds.enabled:
                keep = torch.nonzero(mixed).flatten().tolist()
                if keep:
                    kept.append(batch.select_groups(keep))
                    n_kept += len(keep)
            else:
                kept.append(batch)
                n_kept += batch.num_groups
            need_more = torch.tensor(float(n_kept < per_rank))
            if not ds.enabled or float(self._sum(need_more)) == 0:
                break
            if ds.max_num_gen_batches and gen_batches >= ds.max_num_gen_batches:
                break
        n_mine = min(n_kept, per_rank)
        n_use = int(self._min(torch.tensor(float(n_mine))))
        if ds.enabled and ds.on_exhausted == "raise" and n_use < per_rank:
            raise DynamicSamplingExhausted(
                f"dynamic sampling kept {n_use} of {per_rank} groups per rank after "
                f"{gen_batches} generation batches (train.dynamic_sampling.max_num_gen_batches="
                f"{ds.max_num_gen_batches}); the data may be too easy or too hard "
                "(on_exhausted=partial trains on what was kept)"
            )
        info = {
            "rollout/gen_batches": float(gen_batches),
            "rollout/refill_batches": float(gen_batches - 1),
            "rollout/partial_batch": float(n_use < per_rank),
            # groups this rank kept beyond the smallest rank's count, dropped so ranks match
            "rollout/trimmed_groups": float(self._sum(torch.tensor(float(n_mine - n_use)))),
            "rollout/fill_rate": n_use / per_rank,
            "rollout/mixed_group_frac": float(self._sum(torch.tensor(float(all_mixed)))) / max(
                float(self._sum(torch.tensor(float(all_groups)))), 1.0),
            "reward/all_acc": float(self._cat(torch.cat(all_acc)).mean()),
            "reward/all_mean": float(self._cat(torch.cat(all_scores)).mean()),
        }
        if n_use == 0:
            return None, info
        batch = concat_batches(kept, self.pad_id)
        batch = batch.select_groups(list(range(n_use)))
        return batch, info

    # ---- one step ----
    def train_step(self, step: int) -> dict[str, Any]:
        r, a = self.r, self.r.algo
        t0 = time.perf_counter()
        unwrap(self.model).eval()
        batch, info = self.collect(step)
        self.engine.sleep()  # vLLM: free KV cache / weights while the learner trains
        self.engine_gen_s = time.perf_counter() - t0
        row: dict[str, Any] = {"step": step, **info, "time/gen_s": self.engine_gen_s}
        if batch is None:
            row.update({"time/step_s": time.perf_counter() - t0, "skipped": 1})
            return row

        # ---- old log-probs and entropy (no grad) ----
        t1 = time.perf_counter()
        stats_used = self.state.entropy_stats if a.adaptive_temperature else None
        # [issue 16] the HF engine's behaviour log-probs are the old log-probs when it sampled
        # with these weights at the policy temperature (oldlogp.py): no scoring pass then
        reused = reuse_behaviour_logp(self.r, self.strategy, self.engine, batch)
        old_logp, entropy = reused if reused is not None else self.score(batch, stats_used)
        mask = batch.mask
        row["time/old_logp_s"] = time.perf_counter() - t1

        # ---- entropy stats (batch scope; reused by A at the next step) ----
        stats, stats_info = algo.distributed_entropy_stats(
            entropy, mask, pivot=a.entropy_pivot, mode=a.entropy_norm
        )
        if a.entropy_stats_scope == "microbatch":  # the released code's behaviour
            h = torch.zeros_like(entropy)
            micro_rows = [rows for _, micros in self._mini_batches(len(batch.scores))
                          for rows in micros]
            for rows in micro_rows:
                mb_stats = algo.entropy_stats(entropy[rows], mask[rows], pivot=a.entropy_pivot,
                                              mode=a.entropy_norm)
                h[rows] = algo.normalized_entropy(entropy[rows], mb_stats)
        else:
            h = algo.normalized_entropy(entropy, stats)  # (B, T)
        h = h.masked_fill(~mask, 0.0)

        # ---- advantages ----
        seq_adv = algo.grpo_advantages(batch.scores, batch.group_ids, eps=a.adv_eps)  # (B,)
        seq_tok = seq_adv[:, None].expand_as(mask).masked_fill(~mask, 0.0)  # (B, T)
        fallback = torch.zeros(0)
        if a.token_level_advantage:
            adv, fallback = algo.token_level_group_advantages(
                batch.scores, mask, batch.group_ids, eps=a.adv_eps,
                fallback_threshold=a.fallback_threshold, return_fallback=True,
            )
        else:
            adv = seq_tok
        loss_mask = norm_mask = mask
        if a.baseline == "forking":  # threshold over all ranks' tokens (arXiv 2506.01939 Eq. 5)
            valid_ent = self._cat(entropy[mask].double())
            thr = (algo.quantile_1d(valid_ent, 1.0 - a.forking_quantile, "paper")
                   if valid_ent.numel() else None)
            loss_mask = mask & algo.forking_token_mask(entropy, mask, quantile=a.forking_quantile,
                                                       threshold=thr)
            if a.forking_normalizer == "forking":
                norm_mask = loss_mask
        if a.adaptive_clip:
            eps_low, eps_high = algo.adaptive_clip_bounds(h, a.eps_low, a.eps_high, alpha=a.alpha)
        else:
            eps_low = torch.full_like(h, a.eps_low)
            eps_high = torch.full_like(h, a.eps_high)
        tis = None
        if a.tis_cap is not None:
            tis = algo.tis_weights(old_logp, batch.behaviour_logp, a.tis_cap)

        # ---- PPO epochs ----
        t2 = time.perf_counter()
        upd = self.update(batch, old_logp, adv, loss_mask, h, eps_low, eps_high, tis,
                          norm_mask=norm_mask)
        if r.train.warmup_unit == "training":  # verl: once per update_actor call
            self.sched.step()
        row["time/train_s"] = time.perf_counter() - t2

        # ---- metrics ----
        self.state.entropy_stats = stats
        if self.state.critical_threshold is None:
            valid_ent = self._cat(entropy[mask])
            self.state.critical_threshold = algo.quantile_1d(valid_ent.float(),
                                                             a.critical_quantile, "paper")
        row.update(upd["metrics"])
        row.update(self.batch_metrics(batch, entropy, old_logp, adv, seq_tok, stats, stats_info,
                                      fallback))
        row["time/step_s"] = time.perf_counter() - t0
        every = r.log.token_sample_every
        if every and (step % every == 0 or step == 1):
            self.log.write_tokens(step, self.token_rows(step, batch, entropy, h, adv, upd,
                                                        eps_low, eps_high))
        self.strategy.sync_engine(self.engine)  # HF engine, unsharded: its own module, a no-op
        return row

    def _mini_batches(self, B: int) -> list[tuple[slice, list[slice]]]:
        """(mini-batch rows, its micro-batch row slices) over this rank's B responses: one
        optimizer step per mini-batch, one forward/backward per micro-batch."""
        mini = (self.r.train.mini_batch_prompts // self.world) * self.r.rollout.n
        micro = min(self.r.train.micro_batch_size, mini)
        out = []
        for m0 in range(0, B, mini):
            m1 = min(m0 + mini, B)
            out.append((slice(m0, m1), [slice(s, min(s + micro, m1)) for s in range(m0, m1, micro)]))
        return out

    # ---- forward passes ----
    def _policy_temperature(self, batch: TrainBatch, rows: slice | Tensor):
        if self.r.algo.policy_temperature == "rollout":
            return batch.temperature[rows].to(self.device)
        return self.r.rollout.temperature

    def score(self, batch: TrainBatch, stats_used) -> tuple[Tensor, Tensor]:
        """Old-policy log-probs (at the policy temperature) and untempered entropy, (B, T).

        One untempered pass gives the entropy (and the log-probs when the policy temperature is
        1). Engines that cannot record T_t at decode time (vLLM) get it here, from the learner's
        entropy and the stats the rollout used; then a tempered pass gives the log-probs."""
        mb, r = self.r.train.micro_batch_size, self.r
        T = batch.response_ids.shape[1]
        fused, chunk = r.train.fused_logprobs, r.train.logprob_chunk_size

        def run(temp_of) -> tuple[Tensor, Tensor]:
            lps, ens = [], []
            with torch.no_grad():
                for s in range(0, len(batch.scores), mb):
                    rows = slice(s, s + mb)
                    lp, en = response_logprobs(
                        self.model, batch.input_ids[rows].to(self.device),
                        batch.attention_mask[rows].to(self.device), T, temp_of(rows),
                        fused=fused, chunk_size=chunk,
                    )
                    lps.append(lp.float().cpu())
                    ens.append(en.float().cpu())
            return torch.cat(lps), torch.cat(ens)

        logp1, entropy = run(lambda rows: None)
        entropy = entropy.masked_fill(~batch.mask, 0.0)
        if not batch.decode_stats:
            temps = recompute_adaptive_temperature(
                entropy, r.rollout.temperature,
                r.algo.tau if r.algo.adaptive_temperature else 0.0, stats_used,
            )
            batch.temperature = temps.masked_fill(~batch.mask, 1.0)
            batch.rollout_entropy = entropy.clone()
            batch.decode_stats = True
        if r.algo.policy_temperature == "base" and r.rollout.temperature == 1.0:
            return logp1, entropy
        logp, _ = run(lambda rows: self._policy_temperature(batch, rows))
        return logp, entropy

    def update(self, batch, old_logp, adv, loss_mask, h, eps_low, eps_high, tis, norm_mask=None):
        """PPO epochs; the loss counts `loss_mask` tokens and divides by the global count of
        `norm_mask` tokens (default: loss_mask) per mini-batch."""
        r, a = self.r, self.r.algo
        norm_mask = loss_mask if norm_mask is None else norm_mask
        unwrap(self.model).train()
        B, T = batch.response_ids.shape
        metric_sums = MetricSums()  # [issue 16] summed on the device, read once (reduce.py)
        ratio_all = torch.ones(B, T)
        adv_c_all = adv.clone()
        grad_norms: list[float] = []
        n_opt = n_skipped = 0
        for _epoch in range(r.train.ppo_epochs):
            for m_rows, micros in self._mini_batches(B):
                m_mask = norm_mask[m_rows]
                if a.loss_agg == "token-mean":
                    local = m_mask.sum()
                else:
                    local = (m_mask.sum(-1) > 0).sum()
                normalizer = float(self._sum(local.float()))
                if normalizer == 0:
                    continue
                for i, rows in enumerate(micros):
                    # gradients reduced (DeepSpeed: the engine steps) on the last micro-batch only
                    with self.strategy.micro_batch(i, len(micros)):
                        ids = batch.input_ids[rows].to(self.device)
                        am = batch.attention_mask[rows].to(self.device)
                        logp, _ = response_logprobs(
                            self.model, ids, am, T, self._policy_temperature(batch, rows),
                            fused=r.train.fused_logprobs, chunk_size=r.train.logprob_chunk_size,
                            entropy=False,
                        )
                        o = old_logp[rows].to(self.device)
                        mk = loss_mask[rows].to(self.device)
                        hh = h[rows].to(self.device)
                        el, eh = eps_low[rows].to(self.device), eps_high[rows].to(self.device)
                        adv_mb = adv[rows].to(self.device)
                        ratio = torch.exp((logp.detach() - o).clamp(-20, 20))
                        if a.redistribute:
                            adv_c = algo.redistribute_advantages(adv_mb, hh, ratio, el, eh,
                                                                 beta=a.beta)
                        else:
                            adv_c = adv_mb
                        if tis is not None:
                            adv_c = adv_c * tis[rows].to(self.device)
                        loss, m = algo.policy_loss(
                            logp, o, adv_c, mk, el, eh, clip_c=a.clip_c, agg=a.loss_agg,
                            normalizer=normalizer, h=hh, adv_before=adv_mb,
                        )
                        if not torch.isfinite(loss) and r.train.nonfinite_grad == "abort":
                            raise NonFiniteError(
                                f"non-finite loss at micro-batch rows {rows.start}-{rows.stop}: "
                                f"logp finite={bool(torch.isfinite(logp[mk]).all())}, "
                                f"adv finite={bool(torch.isfinite(adv_c[mk]).all())}; "
                                "last good checkpoint kept"
                            )
                        self.strategy.backward(loss * self.world)
                    ratio_all[rows] = ratio.cpu()
                    adv_c_all[rows] = adv_c.detach().cpu()
                    metric_sums.add(m, mk)  # [issue 16] no host sync per micro-batch
                gn = self.strategy.clip_and_step(r.train.grad_clip)  # steps only if finite
                if not math.isfinite(gn) and r.train.nonfinite_grad == "skip":
                    self.opt.zero_grad(set_to_none=True)  # verl dp_actor: skip the update
                    n_skipped += 1
                    continue
                if not math.isfinite(gn):
                    self.opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(
                        f"non-finite gradient norm ({gn}) at optimizer step {n_opt + 1}; "
                        "last good checkpoint kept"
                    )
                if r.train.warmup_unit == "optimizer":
                    self.sched.step()
                if not self._described:  # optimizer state exists now: record its dtypes
                    self.log.update_manifest(**self.strategy.describe())
                    self._described = True
                self.opt.zero_grad(set_to_none=True)
                grad_norms.append(gn)
                n_opt += 1
        sums, weights = metric_sums.totals()  # [issue 16] one sync for all metrics
        sums, weights = self._sum_dict(sums), self._sum_dict(weights)
        metrics: dict[str, float] = {}
        for k, v in sums.items():
            if k in weights:
                metrics[f"actor/{k}"] = v / max(weights[k], 1e-12)
            elif k == "pg_loss":
                metrics["actor/pg_loss"] = v / max(n_opt, 1)
            else:
                metrics[f"actor/{k}"] = v
        metrics["actor/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        metrics["actor/lr"] = float(self.sched.get_last_lr()[0])
        metrics["actor/optimizer_steps"] = float(n_opt)
        metrics["actor/skipped_steps"] = float(n_skipped)
        unwrap(self.model).eval()
        return {"metrics": metrics, "ratio": ratio_all, "adv_c": adv_c_all}

    # ---- logging ----
    def batch_metrics(self, batch, entropy, old_logp, adv, seq_tok, stats, stats_info, fallback):
        """Step metrics over the whole global batch (all ranks): token entropies and
        per-response values are gathered (for quantiles and per-response means), every other
        token-level quantity is a local sum reduced across ranks."""
        mask = batch.mask
        cat = self._cat
        ent = cat(entropy[mask].float())
        p20, p80 = (algo.quantile_1d(ent, q, "paper") for q in (0.2, 0.8))
        lens = cat(batch.response_len.float())
        acc = cat(batch.acc.float())
        scores = cat(batch.scores.float())
        correct = acc > 0.5
        crit = cat(((entropy >= (self.state.critical_threshold or 0.0)) & mask).sum(-1).float())
        temps = batch.temperature[mask].double()
        gap = (old_logp - batch.behaviour_logp)[mask].abs().double()
        a, sq = adv[mask].double(), seq_tok[mask].double()
        pos, neg = algo.advantage_signs(a, torch.ones_like(a, dtype=torch.bool))
        n_fallback = float(fallback.sum()) if fallback.numel() else 0.0
        t = self._sum_dict({
            "n": float(mask.sum()), "t_sum": float(temps.sum()), "t_sq": float((temps**2).sum()),
            "gap": float(gap.sum()),
            "pos_sum": float(a[pos].sum()), "neg_sum": float(a[neg].sum()),
            "pos_n": float(pos.sum()), "neg_n": float(neg.sum()),
            "seq_pos": float(sq[sq > 0].sum()), "seq_neg": float(sq[sq < 0].sum()),
            "fallback": n_fallback, "trunc": float(batch.truncated.float().sum()),
        })
        n = max(t["n"], 1.0)
        t_mean = t["t_sum"] / n
        t_var = max(t["t_sq"] / n - t_mean**2, 0.0) * (n / max(n - 1, 1.0))  # unbiased
        return {
            "actor/entropy_mean": float(ent.mean()) if ent.numel() else 0.0,
            "actor/entropy_p20": p20,
            "actor/entropy_p80": p80,
            "actor/behaviour_logp_gap": t["gap"] / n,
            "adv/pos_token_sum": t["pos_sum"],
            "adv/neg_token_sum": t["neg_sum"],
            "adv/pos_token_count": t["pos_n"],
            "adv/neg_token_count": t["neg_n"],
            "adv/seq_pos_token_sum": t["seq_pos"],
            "adv/seq_neg_token_sum": t["seq_neg"],
            "adv/fallback_groups": t["fallback"],
            "rollout/response_len_mean": float(lens.mean()),
            "rollout/response_len_correct_mean": float(lens[correct].mean()) if correct.any()
            else None,
            "rollout/response_len_incorrect_mean": float(lens[~correct].mean()) if (~correct).any()
            else None,
            "rollout/critical_tokens": float(crit.mean()),
            "rollout/critical_threshold": self.state.critical_threshold,
            "rollout/temperature_mean": t_mean if t["n"] else None,
            "rollout/temperature_std": math.sqrt(t_var),
            "rollout/truncated_frac": t["trunc"] / max(len(lens), 1),
            "rollout/responses": float(len(lens)),
            "reward/mean": float(scores.mean()),
            "reward/acc": float(acc.mean()),
            "entropy_stats/rho": stats.rho,
            "entropy_stats/std": stats.std,
            "entropy_stats/scale_pos": stats.scale_pos,
            "entropy_stats/scale_neg": stats.scale_neg,
            "entropy_stats/exact": float(bool(stats_info.get("exact", True))),
            "entropy_stats/quantile_bin_error": float(stats_info.get("quantile_bin_error", 0.0)),
        }

    def token_rows(self, step, batch, entropy, h, adv, upd, eps_low, eps_high):
        import pandas as pd

        n = min(self.r.log.token_sample_responses, len(batch.scores))
        g = torch.Generator().manual_seed(self.r.seed * 7919 + step)
        pick = torch.randperm(len(batch.scores), generator=g)[:n].sort().values
        ratio, adv_c = upd["ratio"], upd["adv_c"]
        rows = []
        for i in pick.tolist():
            valid = torch.nonzero(batch.mask[i]).flatten().tolist()
            ids = batch.response_ids[i].tolist()
            for p in valid:
                rt, av = float(ratio[i, p]), float(adv[i, p])
                el, eh = float(eps_low[i, p]), float(eps_high[i, p])
                side = "none"
                if av < 0 and rt < 1 - el:
                    side = "low"
                elif av > 0 and rt > 1 + eh:
                    side = "high"
                rows.append({
                    "step": step, "sample": i, "position": p, "token_id": ids[p],
                    "token_text": self.tok.decode([ids[p]]),
                    "entropy": float(entropy[i, p]), "h": float(h[i, p]),
                    "temperature": float(batch.temperature[i, p]), "ratio": rt,
                    "adv": av, "adv_c": float(adv_c[i, p]), "eps_low": el, "eps_high": eh,
                    "clip_side": side, "reward": float(batch.scores[i]),
                    "acc": float(batch.acc[i]),
                })
        return pd.DataFrame(rows, columns=schema.TOKEN_COLUMNS if hasattr(schema, "TOKEN_COLUMNS")
                            else None)

    # ---- validation and checkpoints ----
    def validate(self, step: int) -> dict[str, float]:
        from ..evaluate import validation_metrics

        unwrap(self.model).eval()
        out = validation_metrics(self.engine, self.tok, self.val_sets, self.r, step,
                                 rank=self.rank, world=self.world)
        self.engine.sleep()
        return out

    def checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        # sharded strategies gather the full model and optimizer state on every rank first
        model_state = self.strategy.full_model_state()
        optim_state = self.strategy.optimizer_state()
        if self.acc.is_main_process:
            save_checkpoint(
                self.run_dir, step, self.acc.unwrap_model(self.model), self.tok, self.opt,
                self.sched, self.stream, self.state, keep=self.r.log.keep_checkpoints,
                model_state=model_state, optim_state=optim_state,
            )
        self.acc.wait_for_everyone()


__all__ = ["train", "TrainSummary", "LoopState", "run_dir_of"]
