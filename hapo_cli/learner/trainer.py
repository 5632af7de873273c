"""`hapo train`: validate everything, build the learner (strategy, model, optimizer, engine,
run directory), run the loop (`loop.py`), and end the run with its status.

Runs on `accelerate.Accelerator` (one process on a laptop CPU, DDP/FSDP/DeepSpeed across GPUs).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if not torch.cuda.is_available():
    import os

    # DeepSpeed (when installed, accelerate imports it) otherwise warns on every run that it
    # "could not detect" an accelerator; on a machine without CUDA the CPU is the answer
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate.utils import set_seed
from rich.console import Console
from torch import nn

from analysis import schema

from ..data import build_val_sets
from ..data.sources import check_source
from ..errors import HapoError, RunDirError, RunFailed, first_line
from ..export import export_folder
from ..interrupts import interrupt_reason
from ..lora import apply_lora, load_adapters
from ..models import ModelError, check_model_dir, load_policy, resolve_policy_path
from ..progress import step_progress
from ..recipe import Recipe
from ..rewards.custom import probe_rewards
from ..rollout.factory import build_engine, samples_with_learner_module
from ..runlog import RunLog, disk_full, os_error_line
from ..trackers import Trackers, check_trackers
from .checkpoint import load_trainer_state
from .dcp_checkpoint import Checkpointer, LoopCheckpoints, export_dir
from .forward import check_packing
from .loop import Loop
from .precision import resolve_precision
from .reference import build_reference
from .resume import usable_checkpoint
from .schedule import build_lr_scheduler
from .state import LoopState, TrainSummary
from .strategy import Strategy, build_accelerator, local_param_bytes
from .streams import build_streams
from .weights import check_engine_sharding
from .zero_checkpoint import ZeroCheckpointer, is_sharded

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def run_dir_of(recipe: Recipe, output_dir: Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    return Path(recipe.log.output_dir) / (recipe.log.run_name or recipe.name)


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
    """Train per `recipe`, writing the run directory. Returns a summary (status done/failed).

    Signals: the `hapo train` command holds `interrupts.interrupt_once` around this call (a
    second Ctrl-C or SIGTERM cannot cut the clean-up short)."""
    learner = build_learner(recipe, output_dir, resume=resume, overwrite=overwrite,
                            progress=progress)
    return learner.run(progress=progress)


@dataclass
class Learner:
    """What `build_learner` returns: the step loop with everything it holds, and how the run
    directory was opened (`RunLog.prepare`: a new run or a resume)."""

    loop: Loop
    mode: str

    def run(self, progress: bool = True) -> TrainSummary:
        """Run the loop; end the run directory with its status whatever happens (done, failed,
        interrupted), and release trackers, the run lock and the engine."""
        loop, runlog, trackers = self.loop, self.loop.runlog, self.loop.trackers
        run_dir = loop.run_dir
        final_status = "failed"
        try:
            trackers.start(loop.recipe.model_dump(mode="json"),
                           runlog.manifest.get("trackers") if self.mode == "resume" else None)
            if trackers.ids:
                runlog.update_manifest(trackers=trackers.ids)
            summary = loop.run(progress=progress)
            final_status = summary.status
            return summary
        except KeyboardInterrupt:  # Ctrl-C, or a preemption signal outside the steps
            final_status = "interrupted"
            why = interrupt_reason()
            how = f" ({why[0]}, {why[1]})" if why and why[0] != "interrupted" else ""
            message = f"interrupted at step {loop.state.step}{how}; continue with --resume"
            _finish_quietly(runlog, "interrupted", message, loop.state.step,
                            **({"reason": why[0]} if why else {}))
            return TrainSummary(run_dir, "interrupted", loop.state.step, message=message,
                                is_main=loop.accelerator.is_main_process)
        except BaseException as exc:
            if loop.saver is not None:  # an asynchronous save still writing
                loop.saver.abandon()
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
            if loop.saver is not None:
                loop.saver.abandon()  # Ctrl-C: a save in flight still completes
            trackers.close(final_status)
            runlog.unlock()
            loop.engine.close()  # local vLLM servers (rollout.engine=vllm-server) stop here


def build_learner(recipe: Recipe, output_dir: Path | None = None, *, resume: bool = False,
                  overwrite: bool = False, progress: bool = True) -> Learner:
    """Validate everything that can be before the run directory changes, then build the
    learner: strategy, model, optimizer, engine, run log, trackers, checkpoint writer."""
    # fp32 master weights and optimizer state; model.dtype / train.mixed_precision set the
    # compute dtype (checked before the run directory is touched: fp16 needs CUDA)
    precision = resolve_precision(recipe.model.dtype, recipe.train.mixed_precision)
    run_dir = run_dir_of(recipe, output_dir)
    recipe_yaml = recipe.to_yaml()
    mode = RunLog.prepare(run_dir, recipe_yaml, resume=resume, overwrite=overwrite)
    check_trackers(recipe.log.trackers, run_dir, resume=mode == "resume")

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    # The strategy (single, DDP, FSDP2, DeepSpeed) comes from `accelerate launch`.
    accelerator, kind = build_accelerator(precision, project_dir=str(run_dir))
    strategy = Strategy(kind, accelerator, precision)
    set_seed(recipe.seed)

    # Everything that can be validated is, before anything in the run directory changes:
    # data files, the model folder, the checkpoint to resume from, optimizer construction.
    _check_data_files(recipe)
    probe_rewards(recipe.data, recipe.train.incorrect_score, recipe.seed)
    # the main process builds (or finds) the warm-up policy; the others then read it from the
    # cache, never racing the build
    with accelerator.main_process_first(), \
            _warmup_bar(progress and accelerator.is_main_process) as on_step:
        policy_path = resolve_policy_path(recipe.model, recipe.data, progress=on_step)
    ckpt = _checkpoint_to_resume(run_dir, mode, accelerator)
    # a sharded checkpoint's weights (DCP, DeepSpeed's) load after sharding
    # (`load_trainer_state`): build from the policy
    sharded_ckpt = ckpt is not None and is_sharded(ckpt)
    # model.lora: the base never changes, so a resumed run loads it again and the adapters on top
    source = policy_path if sharded_ckpt or recipe.model.lora is not None else (ckpt or policy_path)
    model, tokenizer = _load_model(recipe, strategy, source, None if sharded_ckpt else ckpt)
    stream = build_streams(recipe.data, tokenizer, recipe.seed)
    val_sets = build_val_sets(recipe.data, tokenizer)
    if recipe.train.packing:
        check_packing(model)
    if recipe.model.gradient_checkpointing:
        # a transformers PreTrainedModel: nn.Module's __getattr__ types the method as a Tensor
        model.gradient_checkpointing_enable()  # pyright: ignore[reportCallIssue]
    model.train()

    t = recipe.train
    model, optimizer = strategy.prepare(
        model,
        # only what trains (model.lora: the adapters) is in the optimizer
        lambda params: torch.optim.AdamW([p for p in params if p.requires_grad], lr=t.lr,
                                         betas=t.betas, weight_decay=t.weight_decay),
        engine=recipe.rollout.engine, micro_batch_size=t.micro_batch_size, grad_clip=t.grad_clip,
    )
    scheduler = build_lr_scheduler(optimizer, t)
    # The scheduler stays unprepared: accelerate would step it once per process per call,
    # which makes the warm-up depend on the number of processes. We step it per optimizer step
    # or per training step (train.warmup_unit).

    check_engine_sharding(recipe.rollout.engine, accelerator, strategy)
    # vLLM loads from disk: on --resume the checkpoint, the weights the learner just loaded
    # (the warm-up policy there would make the first resumed step sample off-policy)
    engine_path = (_engine_path(recipe, accelerator, run_dir, ckpt, policy_path)
                   if ckpt is not None and sharded_ckpt else source)
    engine = build_engine(recipe.rollout, strategy.engine_model(), tokenizer, str(engine_path),
                          accelerator,
                          max_prompt_length=recipe.data.max_prompt_length,
                          # the learner's compute dtype: train.mixed_precision=bf16 on fp32
                          # masters samples in bf16, as model.dtype=bfloat16 does (verl's
                          # rollout.dtype defaults to bf16 beside fp32 FSDP masters)
                          dtype=str(strategy.precision.compute).removeprefix("torch."),
                          seed=recipe.seed,
                          trust_remote_code=recipe.model.trust_remote_code, run_dir=run_dir)

    state = LoopState()
    if ckpt is not None:
        state = _load(load_trainer_state, ckpt, strategy, scheduler, stream)
    # the engine (an unsharded copy, vLLM) samples from the loaded weights; servers may serve
    # any weights of the model (vllm-server): they get the learner's before the first rollout.
    # model.lora: vLLM loaded the base (`source`), a resumed run's merged adapters go in here
    if (ckpt is not None and (sharded_ckpt or recipe.model.lora is not None)) \
            or engine.push_before_first_rollout:
        engine.sync_from(model, accelerator)

    runlog = _start_runlog(recipe, recipe_yaml, run_dir, mode, accelerator, strategy,
                           policy_path, ckpt, state)
    trackers = Trackers(list(recipe.log.trackers), run_dir, enabled=accelerator.is_main_process)
    reference = build_reference(  # algo.kl_coef > 0: the frozen policy of the KL penalty
        recipe, strategy, policy_path,
        lambda path: _load(load_policy, path, strategy.load_dtype,
                           recipe.model.trust_remote_code)[0])
    if reference is not None:
        runlog.update_manifest(reference_param_bytes_per_rank=local_param_bytes(reference.model))
    loop = Loop(recipe, accelerator, model, optimizer, scheduler, engine, tokenizer, stream,
                val_sets, runlog, run_dir, state, strategy=strategy, reference=reference,
                trackers=trackers, saver=_saver(recipe, strategy, run_dir))
    return Learner(loop, mode)


def _checkpoint_to_resume(run_dir: Path, mode: str, accelerator: Accelerator) -> Path | None:
    """The newest checkpoint that loads under --resume (None: a new run, or none written
    yet); refuses when checkpoints exist but none loads (restarting would drop the run's rows)."""
    ckpt, skipped = usable_checkpoint(run_dir) if mode == "resume" else (None, [])
    if skipped and ckpt is None:  # restarting would discard the run's rows: refuse instead
        raise RunDirError(
            f"{run_dir}: no checkpoint loads ({'; '.join(skipped)}); nothing was changed; "
            "pass --overwrite to start the run again"
        )
    for line in skipped:
        _warn(accelerator, f"--resume: skipping unreadable checkpoint {line}")
    if ckpt is not None and skipped:
        _warn(accelerator, f"--resume: continuing from {ckpt.name}")
    elif mode == "resume" and ckpt is None:
        _warn(accelerator, "--resume: no checkpoint yet; the run restarts from step 0")
    return ckpt


def _load_model(recipe: Recipe, strategy: Strategy, source: Path,
                adapters_from: Path | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The policy and its tokenizer from `source`, under the strategy's loading context; with
    model.lora, the adapters on top (read from `adapters_from`, an HF checkpoint, if given)."""
    check_model_dir(source)
    lora = recipe.model.lora
    model, tokenizer = _load(partial(strategy.load_policy, lora=lora is not None), source,
                             recipe.model.trust_remote_code)
    if lora is not None:
        model = apply_lora(model, lora)
        strategy.lora = lora
        if adapters_from is not None:  # a DCP checkpoint restores them with the rest
            load_adapters(model, adapters_from)
    return model, tokenizer


def _start_runlog(recipe: Recipe, recipe_yaml: str, run_dir: Path, mode: str,
                  accelerator: Accelerator, strategy: Strategy, policy_path: Path,
                  ckpt: Path | None, state: LoopState) -> RunLog:
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
    return runlog


def _saver(recipe: Recipe, strategy, run_dir: Path):
    """Sharded checkpoints unless log.checkpoint_format=hf or a LoRA run (its adapters are
    small; the HF folder holds them): None = the HF format. DCP shards (dcp_checkpoint.py);
    under DeepSpeed ZeRO, whose flat partitions DCP cannot address, DeepSpeed's own per-rank
    files (zero_checkpoint.py)."""
    if recipe.log.checkpoint_format != "dcp":
        return None
    if getattr(recipe.model, "lora", None):  # adapters: small, saved with the HF folder
        return None
    keep = recipe.log.keep_checkpoints
    saver = (ZeroCheckpointer(run_dir, strategy, keep=keep, async_save=recipe.log.async_save)
             if strategy.kind == "deepspeed" else
             Checkpointer(run_dir, strategy.accelerator, keep=keep,
                          async_save=recipe.log.async_save))
    return LoopCheckpoints(saver, recipe.log.export_every, recipe.train.max_steps)


def _engine_path(recipe: Recipe, accelerator, run_dir: Path, ckpt: Path, policy_path: Path):
    """The folder an engine starts from on a sharded (DCP, ZeRO) resume. The HF engine samples
    with the learner's module (or its copy): the policy folder will do. vLLM loads from disk:
    the run's HF export of that step, which the main process writes from the shards if the run
    has none (`sync_from` pushes the loaded weights afterwards either way)."""
    if samples_with_learner_module(recipe.rollout.engine):
        return policy_path
    step = schema.checkpoint_step(ckpt.name)
    assert step is not None, ckpt  # usable_checkpoint returns step-N folders only
    out = export_dir(run_dir, step)
    if accelerator.is_main_process and not out.is_dir():
        export_folder(ckpt, out)
    accelerator.wait_for_everyone()
    return out


def _warn(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def _load(fn, path, *args):
    """Call a loader; any failure is one line naming the folder (ModelError, exit 2)."""
    try:
        return fn(path, *args)
    except HapoError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError, torch pickle errors
        raise ModelError(f"{path}: cannot be loaded ({type(exc).__name__}: {first_line(exc)})") from None


def _finish_quietly(runlog: RunLog, status: str, message: str, step: int, **extra) -> None:
    """Mark the manifest; if even that write fails (disk still full), the run is no worse off."""
    try:
        runlog.finish(status, message=message, final_step=step, **extra)
    except OSError:
        pass


def _remove_temporaries(run_dir: Path) -> None:
    """Half-written checkpoint folders of a failed save (the run directory's own files are
    written by runlog, whose writers remove their temporary file when a write fails)."""
    ckpts = Path(run_dir) / schema.CHECKPOINTS_DIR
    for tmp in ckpts.glob(".step-*.tmp") if ckpts.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_data_files(recipe: Recipe) -> None:
    if recipe.data.source != "files":
        return
    for field_name in ("train_files", "val_files"):
        for f in getattr(recipe.data, field_name):
            check_source(f, f"data.{field_name}")


@contextmanager
def _warmup_bar(show: bool):
    """A callback (step, total) driving a rich bar for the supervised warm-up, if one runs."""
    bar = None
    task = None

    def on_step(step: int, total: int) -> None:
        nonlocal task, bar
        if bar is None or task is None:
            bar = step_progress("warm-up", total, disable=not show)
            bar.start()
            task = bar.add_task("warm-up", total=total, info="")
        bar.update(task, completed=step, total=total)

    try:
        yield on_step
    finally:
        if bar is not None:
            bar.stop()


__all__ = ["train", "TrainSummary", "LoopState", "run_dir_of"]
