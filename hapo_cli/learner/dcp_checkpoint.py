"""Resume checkpoints in torch.distributed.checkpoint (DCP) format: every rank writes its own
shards, asynchronously by default, and a load reshards to any world size or strategy.

    checkpoints/step-000040/
      trainer_state.json      step, "format": "dcp", recipe, data stream, entropy stats
      scheduler.pt, rng.pt    the LR schedule, the torch RNG            (main process, once)
      config.json, generation_config.json, tokenizer files              (for `hapo export`)
      dcp/.metadata           DCP's index of every tensor's chunks
      dcp/__<r>_0.distcp      rank r's shards of the model and the AdamW moments

The state saved is `get_state_dict(model, optimizer)`: parameter-name keyed, DTensor shards
under FSDP2 (no gather), plain tensors under DDP / one process (DCP writes a replicated tensor
once). Loading asks DCP for the tensors of *this* run's layout, so 2 FSDP2 ranks -> 1 process,
1 -> 2, and FSDP2 <-> DDP all load the same folder.

A checkpoint counts once complete: everything is written into `.step-000040.tmp/` and the main
process renames it when the last rank's shards are on disk (DCP's coordinator writes
`.metadata` after gathering every rank's write results; `publish` runs after that). A kill -9
mid-save leaves only the temporary folder, which `list_checkpoints` ignores, so the previous
checkpoint stays the newest. One save is in flight at a time: the next save, the end of the
run, and a failure wait for it (`wait`), and a write error (a full disk) surfaces there.

An asynchronous save holds the training thread only for `get_state_dict` (no copy): the next
step's rollout and forward/backward change no weight and no Adam moment, only `optimizer.step`
does, so a step pre-hook on the optimizer waits there until the save no longer reads the live
tensors (on CPU: the write is done, no second copy of the state is made; with an accelerator:
DCP's `DefaultStager` has copied them to pinned host memory in its own thread). What is written
is the state at the save step, bit for bit. The write runs in DCP's upload thread over its own
gloo group, never the training collectives' group (two threads' collectives on one group would
interleave).
DeepSpeed ZeRO keeps its own per-rank format (`zero_checkpoint.py`): `get_state_dict` cannot
address its flat fp32 partitions.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save, save

from analysis import schema

from ..errors import HapoError
from ..models import ModelError, check_tokenizer
from .checkpoint import (
    checkpoint_dir,
    fresh_temporary_dir,
    new_run_command,
    publish,
    temporary_dir,
    write_trainer_files,
)
from .forward import unwrap

# one process is a supported layout here, not a mistake DCP should warn about on every save
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized", category=UserWarning)

DCP_DIR = "dcp"
FORMAT = "dcp"
EXPORTS_DIR = "exports"


def is_dcp(ckpt: Path) -> bool:
    """Whether `ckpt` is a DCP checkpoint (else today's HF folder + optimizer.pt)."""
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def probe_dcp(ckpt: Path) -> None:
    """ValueError unless the DCP index reads and every shard file it names is on disk at least
    as long as the bytes it indexes there (a truncated or missing shard), without reading the
    tensors; plus the config and tokenizer `hapo export` needs."""
    folder = Path(ckpt) / DCP_DIR
    try:
        meta = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # unpickling a truncated/garbled .metadata
        raise ValueError(f"{DCP_DIR}/.metadata: unreadable ({type(exc).__name__})") from None
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{DCP_DIR}/{name}: missing")
        if f.stat().st_size < size:
            raise ValueError(f"{DCP_DIR}/{name}: truncated ({f.stat().st_size} of {size} bytes)")
    probe_config_files(ckpt)


def probe_config_files(ckpt: Path) -> None:
    """ValueError unless `ckpt` holds the config.json and tokenizer `hapo export` builds the
    model from (a sharded checkpoint: DCP, or DeepSpeed's `zero_checkpoint.py`)."""
    try:
        cfg = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("config.json: missing or not JSON") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ValueError("config.json: no 'model_type'")
    try:
        check_tokenizer(Path(ckpt))
    except ModelError as exc:
        raise ValueError(str(exc)) from None


def torch_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def train_state(model, optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...}: this rank's view, keyed by parameter name (collective
    under FSDP2; an optimizer that has not stepped gets its state initialised first)."""
    msd, osd = get_state_dict(model, torch_optimizer(optimizer))
    return {"model": msd, "optim": osd}


def _step_dtype(*, fused: bool | None) -> torch.dtype:
    """The dtype of Adam's `step` count: torch's private `optim.optimizer._get_scalar_dtype`
    (the same code in torch 2.4 through 2.13), restated so that no private name is imported;
    tests/test_dcp.py compares `init_adam_state` with the state a real first step builds."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_adam_state(optimizer) -> bool:
    """Give a fresh Adam/AdamW the state its first step would create (step 0, zero moments),
    without stepping: `get_state_dict` would otherwise take a step with zero gradients and
    lr 0, allocating a gradient per parameter and AdamW's temporaries beside the moments
    (resume's peak). False (nothing done) for another optimizer or one that has state."""
    opt = torch_optimizer(optimizer)
    if opt.state or type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    for group in opt.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            if not p.requires_grad:
                continue
            st = opt.state[p]  # as torch.optim.Adam._init_group builds it
            st["step"] = (torch.zeros((), dtype=_step_dtype(fused=group.get("fused")),
                                      device=p.device) if on_device
                          else torch.tensor(0.0, dtype=_step_dtype(fused=False)))
            moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            for k in moments:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return True


def load_train_state(ckpt: Path, model, optimizer, process_group=None) -> None:
    """Load model and optimizer from a DCP checkpoint into this run's (sharded or not) layout
    (every rank calls it). DCP reads each saved chunk and copies it into the live parameters
    and optimizer state in place (one chunk's temporary at a time)."""
    init_adam_state(optimizer)
    state = train_state(model, optimizer)
    load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR), process_group=process_group,
         no_dist=not _distributed())
    set_state_dict(model, torch_optimizer(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def load_into_strategy(ckpt: Path, strategy) -> None:
    """`load_train_state` into a learner `Strategy`'s model and optimizer; DeepSpeed ZeRO is
    one line saying what it cannot do and what works instead."""
    if strategy.kind == "deepspeed":
        run, step = Path(ckpt).parent.parent, schema.checkpoint_step(Path(ckpt).name)
        raise HapoError(
            f"{ckpt}: a DCP checkpoint cannot resume under DeepSpeed ZeRO (DCP cannot address "
            "its flat fp32 partitions); resume it with FSDP2 or DDP (accelerate launch "
            "--config_file recipes/accelerate/fsdp.yaml or ddp.yaml), or convert its weights "
            f"into a new run (optimizer state and data position start afresh): hapo export "
            f"{run} --step {step} --out DIR, then {new_run_command(run, 'DIR')}")
    load_train_state(ckpt, strategy.model, strategy.optimizer)


def load_model_weights(ckpt: Path, model) -> None:
    """Fill an unsharded `model` (one plain process) with the checkpoint's weights; the
    optimizer's entries are not read."""
    sd = {k: v for k, v in model.state_dict().items()}
    state = {"model": sd}
    load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=True)
    model.load_state_dict(state["model"])


def write_config_files(folder: Path, model, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer: with the DCP shards, all that
    `hapo export` needs to write a save_pretrained folder."""
    base = unwrap(model)
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _first_cause(exc: BaseException) -> BaseException:
    """DCP's CheckpointException (a BaseException holding each rank's error) -> the error of
    the lowest failing rank, so a full disk is an OSError the trainer reports in one line."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = failures[min(failures)]
        cause = cause[0] if isinstance(cause, tuple) else cause
        if isinstance(cause, BaseException):
            return cause
    return exc


def background_stager() -> AsyncStager:
    """DCP's stager copying to host memory in its own thread (pinned memory and a side stream
    for the device-to-host copies when an accelerator is present)."""
    dev = torch.accelerator.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=dev, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=dev))


class LiveState(AsyncStager):
    """No staging copy: DCP's writer thread reads the live tensors (host memory already), and
    the next optimizer step waits until the write is done."""

    _synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict


def open_folder(run_dir: Path, step: int, accelerator, write_small) -> Path:
    """The fresh temporary folder of checkpoint `step` with the main process's small files
    (`write_small(folder)`), returned once every rank may write into it (collective)."""
    tmp = temporary_dir(run_dir, step)
    if accelerator.is_main_process:
        fresh_temporary_dir(run_dir, step)
        write_small(tmp)
    accelerator.wait_for_everyone()  # the folder exists before any rank writes
    return tmp


class Checkpointer:
    """Writes DCP checkpoints; every rank holds one and calls `save` and `wait` together.

    An asynchronous save returns after `get_state_dict` (no copy); a step pre-hook on the
    optimizer makes the next `optimizer.step` (the first change to a saved tensor) wait until
    the saved tensors are no longer read: `copy_state=True`, until DCP's staging thread has
    copied them to host memory (the default with an accelerator: device memory must come to
    the host anyway); `False`, until the write itself is done (the default on CPU: no second
    copy of the state in memory). `stager`: makes each save's AsyncStager (tests hold it)."""

    format = FORMAT  # trainer_state.json's "format"

    def __init__(self, run_dir: Path, accelerator, *, keep: int, async_save: bool = True,
                 copy_state: bool | None = None, stager=None):
        self.run_dir, self.accelerator, self.keep = Path(run_dir), accelerator, keep
        self.async_save = async_save
        self.copy_state = (torch.accelerator.is_available() if copy_state is None
                           else copy_state)
        self.stager = stager or (background_stager if self.copy_state else LiveState)
        self.main = accelerator.is_main_process
        # DCP's background thread gets its own gloo group (collective: every rank builds it)
        # (every rank is a member: a ProcessGroup, never new_group's int NON_GROUP_MEMBER)
        self.group = cast("dist.ProcessGroup | None",
                          dist.new_group(backend="gloo") if _distributed() else None)
        self._pending: Future | None = None
        self._in_use: Future | None = None  # done once the saved tensors may change
        self._hooked: set[int] = set()  # id() of the optimizers whose steps call `release`
        self._published = threading.Event()
        self._error: BaseException | None = None
        self.last_stall_s = 0.0  # how long the last `save` call held the training thread
        self.last_step_wait_s = 0.0  # how long the next optimizer step waited for it

    def save(self, step: int, model, optimizer, write_small) -> None:
        """Checkpoint `step`. `write_small(folder)`: the main process's small files."""
        t0 = time.perf_counter()
        self.wait()
        tmp = open_folder(self.run_dir, step, self.accelerator, write_small)
        state = train_state(model, optimizer)
        target = str(tmp / DCP_DIR)
        if not self.async_save:
            try:
                save(state, checkpoint_id=target, process_group=self.group,
                     no_dist=self.group is None)
            except BaseException as exc:
                raise _first_cause(exc) from None
            if self.main:
                publish(tmp, checkpoint_dir(self.run_dir, step), self.run_dir, self.keep)
            self.accelerator.wait_for_everyone()
            self.last_stall_s = time.perf_counter() - t0
            return
        self._published.clear()
        self._error = None
        self.last_step_wait_s = 0.0
        stager = self.stager()
        # `state` holds the live tensors, read by DCP's threads while training goes on
        res = async_save(state, checkpoint_id=target, process_group=self.group,
                         no_dist=self.group is None, async_stager=stager)
        if isinstance(res, AsyncSaveResponse):  # staged in a thread of its own
            staged, written = res.staging_completion, res.upload_completion
        else:  # staged (or not copied) in this thread
            staged = written = res
        self._in_use = staged if self.copy_state else written
        opt = torch_optimizer(optimizer)
        if id(opt) not in self._hooked:  # once: a hook never removes itself mid-iteration
            opt.register_step_pre_hook(lambda *_: self.release())
            self._hooked.add(id(opt))
        written.add_done_callback(lambda f: self._finish(f, tmp, step, stager))
        self._pending = written
        self.last_stall_s = time.perf_counter() - t0

    def release(self) -> None:
        """Block until the save in flight no longer reads the live training state (which may
        change from then on); its errors surface in `wait`."""
        in_use, self._in_use = self._in_use, None
        if in_use is not None:
            t0 = time.perf_counter()
            wait_futures([in_use])
            self.last_step_wait_s += time.perf_counter() - t0

    def _finish(self, fut: Future, tmp: Path, step: int, stager: AsyncStager) -> None:
        """DCP's thread, once this rank's save ended: the main process publishes it."""
        try:
            stager.close()  # its host copy goes (and its staging thread)
            if fut.exception() is None and self.main:
                publish(tmp, checkpoint_dir(self.run_dir, step), self.run_dir, self.keep)
        except BaseException as exc:  # a full disk at the rename: reported by `wait`
            self._error = exc
        finally:
            self._published.set()

    def wait(self) -> None:
        """Block until the save in flight is written and published; raise its error."""
        self.release()
        fut, self._pending = self._pending, None
        if fut is None:
            return
        try:
            fut.result()
        except BaseException as exc:
            raise _first_cause(exc) from None
        self._published.wait()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Wait for the save in flight, ignoring its outcome (a failing run cleans up next)."""
        try:
            self.wait()
        except BaseException:
            pass


def export_dir(run_dir: Path, step: int) -> Path:
    """<run>/exports/step-000040: what the run exported at `step`."""
    return Path(run_dir) / EXPORTS_DIR / Path(schema.checkpoint_dir(step)).name


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out` (replacing an older export of the same name)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def write_export(run_dir: Path, step: int, model, tokenizer,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """`model` (or the gathered `state` of a sharded one) as a save_pretrained folder under
    <run>/exports (main process; written aside, then renamed)."""
    out = export_dir(run_dir, step)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out)
    return out


class Saver(Protocol):
    """What writes a run's sharded checkpoints: `Checkpointer` (DCP), or under DeepSpeed ZeRO
    `zero_checkpoint.ZeroCheckpointer`."""

    format: str  # trainer_state.json's "format"

    def save(self, step: int, model, optimizer, write_small) -> None: ...

    def wait(self) -> None: ...

    def abandon(self) -> None: ...


class LoopCheckpoints:
    """What `Loop.checkpoint` does under log.checkpoint_format=dcp: the sharded save of model
    and optimizer (every rank: DCP, or DeepSpeed's own under ZeRO), the small files (main
    process), and the Hugging Face export when due (log.export_every, and the last step)."""

    def __init__(self, checkpointer: Saver, export_every: int, max_steps: int):
        self.checkpointer, self.export_every, self.max_steps = checkpointer, export_every, max_steps

    def save(self, loop, step: int) -> None:
        def small(folder: Path) -> None:
            write_trainer_files(folder, loop.run_dir, step, loop.scheduler, loop.stream,
                                loop.state, format=self.checkpointer.format)
            write_config_files(folder, loop.model, loop.tokenizer)

        self.checkpointer.save(step, loop.model, loop.optimizer, small)
        if step == self.max_steps or (self.export_every and step % self.export_every == 0):
            self.export(loop, step)

    def export(self, loop, step: int) -> None:
        """A save_pretrained folder of the fp32 weights at `step` (collective: the full
        weights gathered onto the main process only)."""
        state = loop.strategy.full_model_state()  # None: the module's own state dict
        if loop.accelerator.is_main_process:
            write_export(loop.run_dir, step, unwrap(loop.model), loop.tokenizer, state)
        loop.accelerator.wait_for_everyone()

    def wait(self) -> None:
        self.checkpointer.wait()

    def abandon(self) -> None:
        self.checkpointer.abandon()


__all__ = ["DCP_DIR", "FORMAT", "EXPORTS_DIR", "Checkpointer", "LoopCheckpoints", "is_dcp",
           "train_state", "load_train_state", "load_into_strategy", "load_model_weights", "write_config_files",
           "export_dir", "write_export", "probe_dcp", "probe_config_files", "open_folder"]
