"""Resume checkpoints under DeepSpeed ZeRO in DeepSpeed's own per-rank format: every rank writes
its own partition, nothing is gathered.

    checkpoints/step-000040/
      trainer_state.json      step, "format": "zero", recipe, data stream, entropy stats
      scheduler.pt, rng.pt    the LR schedule, the torch RNG            (main process, once)
      config.json, generation_config.json, tokenizer files              (for `hapo export`)
      zero/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's fp32 master partition and
                                                          AdamW moments
      zero/*model_states.pt   ZeRO-3: each rank's (placeholders, buffers, parameter shapes);
                              ZeRO-1/2: the main process's module state
      zero_to_fp32.py         DeepSpeed's recovery script (it reads zero/)

Written by `engine.save_checkpoint` (deepspeed/runtime/engine.py), read back by
`engine.load_checkpoint`, and merged into one fp32 state dict in one process by DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` (utils/zero_to_fp32.py, memory-mapped and lazy):
`hapo export` and `hapo evaluate` need no DeepSpeed engine and no GPU.

DCP cannot address ZeRO's flat fp32 partitions (`torch.distributed.checkpoint.get_state_dict`
knows FSDP and plain modules), so this is what log.checkpoint_format=dcp (the default) writes
under DeepSpeed. Like DeepSpeed without its universal-checkpoint conversion it resumes on the
number of ranks and ZeRO stage that wrote it; another number, stage or strategy is one line
naming the commands that convert its weights into a new run. Saves are asynchronous by default
(`ZeroCheckpointer`: DeepSpeed's files, written by a thread of ours). log.checkpoint_format=hf
keeps the older layout (`zero_state.py`: the main process's gathered HF folder beside each
rank's partition).
"""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from analysis import schema

from ..errors import HapoError
from .checkpoint import checkpoint_dir, new_run_command, publish
from .dcp_checkpoint import is_dcp, open_folder, probe_config_files, torch_optimizer
from .zero_state import load_file

FORMAT = "zero"
ZERO_DIR = "zero"  # DeepSpeed's checkpoint tag: the folder of its files
OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def is_zero(ckpt: Path) -> bool:
    """Whether `ckpt` is a checkpoint in DeepSpeed's per-rank format (this module)."""
    folder = Path(ckpt) / ZERO_DIR
    return folder.is_dir() and any(OPTIM.match(f.name) for f in folder.iterdir())


def is_sharded(ckpt: Path) -> bool:
    """Whether `ckpt` holds its weights in per-rank shards (DCP or DeepSpeed's), with config and
    tokenizer beside them; else it is a save_pretrained folder (+ optimizer files)."""
    return is_dcp(ckpt) or is_zero(ckpt)


def written_world(ckpt: Path) -> int:
    """The number of data-parallel ranks that wrote `ckpt`, as DeepSpeed recorded it
    (`dp_world_size` of its model-state file; ValueError without a readable one)."""
    return int(_recorded(ckpt)["dp_world_size"])


def written_stage(ckpt: Path) -> int | None:
    """The ZeRO stage that wrote `ckpt` (its recorded DeepSpeed config); None: not recorded."""
    stage = ((_recorded(ckpt).get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    return None if stage is None else int(stage)


def _recorded(ckpt: Path) -> dict[str, Any]:
    files = sorted((Path(ckpt) / ZERO_DIR).glob("*model_states.pt"))
    if not files:
        raise ValueError(f"{ZERO_DIR}/: no *model_states.pt")
    try:
        state = load_file(files[0])
        int(state["dp_world_size"])
        return state
    except Exception as exc:  # a truncated zip, a refused pickle, no such key
        raise ValueError(f"{ZERO_DIR}/{files[0].name}: cannot be loaded safely "
                         f"({type(exc).__name__})") from None


def probe_zero(ckpt: Path) -> None:
    """ValueError unless every rank's partition file is there and every file of the DeepSpeed
    folder loads through `weights_only` (memory-mapped: cheap); plus config and tokenizer."""
    folder = Path(ckpt) / ZERO_DIR
    world = written_world(ckpt)
    have = {int(m.group(1)) for f in folder.iterdir() if (m := OPTIM.match(f.name))}
    missing = sorted(set(range(world)) - have)
    if missing:
        raise ValueError(f"{ZERO_DIR}/: no partition of rank {missing[0]} (of {world})")
    for f in sorted(folder.glob("*.pt")):
        try:
            load_file(f)
        except Exception as exc:  # a truncated zip, a refused pickle
            raise ValueError(f"{ZERO_DIR}/{f.name}: cannot be loaded safely "
                             f"({type(exc).__name__})") from None
    probe_config_files(ckpt)


def _engine(strategy):
    return strategy.accelerator.deepspeed_engine_wrapped.engine


class ZeroCheckpointer:
    """Writes checkpoints with DeepSpeed's `engine.save_checkpoint` (every rank its own files,
    in parallel); the same calls as `dcp_checkpoint.Checkpointer`.

    Asynchronous (log.async_save, the default): `engine.save_checkpoint` runs as usual (its
    barriers, its state dicts: references to the live partitions and moments, no copy), but
    each file it hands its checkpoint engine is queued, and one writer thread per rank writes
    them while training goes on. Nothing before the next optimizer step changes a saved tensor
    (forward and backward read the partitions, gradients are not saved), so a pre-hook on the
    torch optimizer inside DeepSpeed makes that step wait until this rank's files are written:
    the checkpoint holds the save step's state bit for bit, and no second copy of it is made.
    The writers then agree over their own gloo group (never the training collectives' group)
    that every rank's files are on disk, and the main process publishes the folder. One save
    is in flight at a time; the next save, the end of the run and a failure wait for it, and a
    write error (a full disk) surfaces there."""

    format = FORMAT

    def __init__(self, run_dir: Path, strategy, *, keep: int, async_save: bool = True):
        self.run_dir, self.strategy, self.keep = Path(run_dir), strategy, keep
        self.accelerator = strategy.accelerator
        self.main = self.accelerator.is_main_process
        self.async_save = async_save
        distributed = dist.is_available() and dist.is_initialized()
        # the writers' own group (collective: every rank builds it), as dcp_checkpoint's
        self.group = dist.new_group(backend="gloo") if async_save and distributed else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hapo-zero-save")
        self._pending: Future | None = None
        self._written = threading.Event()
        self._written.set()
        self._hooked: set[int] = set()
        self.last_stall_s = 0.0  # how long the last `save` call held the training thread
        self.last_step_wait_s = 0.0  # how long the next optimizer step waited for it

    def save(self, step: int, model, optimizer, write_small) -> None:
        """Checkpoint `step` (collective). `write_small(folder)`: the main process's files."""
        del model, optimizer  # the engine holds both
        t0 = time.perf_counter()
        self.wait()
        tmp = open_folder(self.run_dir, step, self.accelerator, write_small)
        engine = _engine(self.strategy)
        if not self.async_save:
            engine.save_checkpoint(str(tmp), tag=ZERO_DIR, save_latest=False)
            self.accelerator.wait_for_everyone()  # every rank's files are on disk
            if self.main:
                publish(tmp, checkpoint_dir(self.run_dir, step), self.run_dir, self.keep)
            self.accelerator.wait_for_everyone()
            self.last_stall_s = time.perf_counter() - t0
            return
        files = self._collect(engine, tmp)
        opt = torch_optimizer(engine.optimizer)
        if id(opt) not in self._hooked:  # once: a hook never removes itself mid-iteration
            opt.register_step_pre_hook(lambda *_: self.release())
            self._hooked.add(id(opt))
        self._written.clear()
        self.last_step_wait_s = 0.0
        self._pending = self._pool.submit(self._write, engine.checkpoint_engine, files, tmp, step)
        self.last_stall_s = time.perf_counter() - t0

    @staticmethod
    def _collect(engine, tmp: Path) -> list[tuple[Any, str]]:
        """Run `engine.save_checkpoint` with its checkpoint engine's writes queued, not made:
        [(state dict of live tensors, path)]."""
        ckpt_engine, files = engine.checkpoint_engine, []
        ckpt_engine.save = lambda state_dict, path: files.append((state_dict, path))  # this call
        try:
            engine.save_checkpoint(str(tmp), tag=ZERO_DIR, save_latest=False)
        finally:
            del ckpt_engine.save  # the class's own again
        return files

    def _write(self, ckpt_engine, files: list[tuple[Any, str]], tmp: Path, step: int) -> None:
        """The writer thread: this rank's files (with the checkpoint engine's own `save`), then
        every rank agrees they are all on disk and the main process publishes."""
        error: BaseException | None = None
        try:
            for state, path in files:
                ckpt_engine.save(state, path)
        except BaseException as exc:  # a full disk: reported by `wait`, after the agreement
            error = exc
        finally:
            files.clear()  # the live tensors are no longer referenced from here
            self._written.set()
        ok = torch.tensor([0 if error else 1])
        if self.group is not None:  # every rank takes part, failed or not: none is left waiting
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if error is not None:
            raise error
        if not ok.item():
            raise HapoError(f"checkpoint step {step}: another rank could not write its ZeRO "
                            "partition (its error is in that rank's output)")
        if self.main:
            publish(tmp, checkpoint_dir(self.run_dir, step), self.run_dir, self.keep)

    def release(self) -> None:
        """Block until this rank's files of the save in flight are written (the live tensors
        they hold may change from then on); errors surface in `wait`."""
        if not self._written.is_set():
            t0 = time.perf_counter()
            self._written.wait()
            self.last_step_wait_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the save in flight is written on every rank and published; raise its
        error."""
        self.release()
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    def abandon(self) -> None:
        """Wait for the save in flight, ignoring its outcome (a failing run cleans up next)."""
        try:
            self.wait()
        except BaseException:
            pass


def not_resumable_here(ckpt: Path, world: int, why: str, stage: int | None = None) -> HapoError:
    run, step = Path(ckpt).parent.parent, schema.checkpoint_step(Path(ckpt).name)
    configs = (f"recipes/accelerate/zero{stage}.yaml" if stage in (2, 3) else
               "recipes/accelerate/zero2.yaml or zero3.yaml")
    return HapoError(
        f"{ckpt}: holds DeepSpeed ZeRO partitions for {world} ranks ({why}); resume it under "
        f"DeepSpeed (accelerate launch --config_file {configs} --num_processes {world}), or "
        "convert its weights into a new run (optimizer state and "
        f"data position start afresh): hapo export {run} --step {step} --out DIR, then "
        f"{new_run_command(run, 'DIR')}")


def load_into_strategy(ckpt: Path, strategy) -> None:
    """Restore model and optimizer (fp32 masters, moments, the engine's step counters) from
    `ckpt` (every rank calls it); another world size or strategy is one line."""
    world, stage = written_world(ckpt), written_stage(ckpt)
    if strategy.kind != "deepspeed":
        raise not_resumable_here(ckpt, world, f"which {strategy.kind} cannot resume", stage)
    if world != strategy.world:
        raise not_resumable_here(ckpt, world, f"this run has {strategy.world}", stage)
    engine = _engine(strategy)
    if stage is not None and stage != engine.zero_optimization_stage():
        raise not_resumable_here(
            ckpt, world, f"written under ZeRO-{stage}, this run is ZeRO-"
                         f"{engine.zero_optimization_stage()}", stage)
    # each rank reads its own partition (a rigid checkpoint: DeepSpeed loads no other rank's);
    # the weights come from the fp32 masters (zero_load_from_fp32_weights, DeepSpeed's default).
    # Its files are read memory-mapped and through weights_only (`probe_zero` checked both):
    # DeepSpeed's checkpoint engine would unpickle each whole into memory first
    ckpt_engine = engine.checkpoint_engine
    ckpt_engine.load = _mapped_load  # this call only
    try:
        path, _ = engine.load_checkpoint(
            str(ckpt), tag=ZERO_DIR, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=False)
    finally:
        del ckpt_engine.load  # the class's own again
    if path is None:
        raise HapoError(f"{ckpt}: DeepSpeed found no checkpoint in {ZERO_DIR}/")


def _mapped_load(path: str, map_location=None) -> Any:
    del map_location  # DeepSpeed asks for the CPU: so does load_file
    return load_file(Path(path))


def full_state_dict(ckpt: Path) -> dict[str, Any]:
    """{name: lazily loaded fp32 tensor} of the whole model, in one process (no engine):
    DeepSpeed's merge of every rank's fp32 partition, tied weights under each of their names.
    `.contiguous()` on a value materialises it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with redirect_stdout(io.StringIO()):  # its progress prints
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ZERO_DIR, lazy_mode=True)
    if state is None:  # (its annotation allows it; no path returns it)
        raise HapoError(f"{ckpt}: DeepSpeed merged no state from {ZERO_DIR}/")
    return dict(state)


def load_model_weights(ckpt: Path, model) -> None:
    """Fill an unsharded `model` (one plain process) with the checkpoint's fp32 weights and
    buffers, one tensor at a time."""
    state = full_state_dict(ckpt)
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state) - _non_persistent(model))
    if missing:
        raise HapoError(f"{ckpt}: the ZeRO checkpoint holds no {missing[0]} "
                        f"({len(missing)} tensors missing)")
    with torch.no_grad():
        for name, lazy in state.items():
            if name in own:
                t = lazy if isinstance(lazy, torch.Tensor) else lazy.contiguous()
                own[name].copy_(t)


def _non_persistent(model) -> set[str]:
    return {f"{m}.{b}" if m else b for m, mod in model.named_modules()
            for b in mod._non_persistent_buffers_set}


__all__ = ["FORMAT", "ZERO_DIR", "is_zero", "is_sharded", "written_world", "written_stage",
           "probe_zero", "ZeroCheckpointer", "not_resumable_here", "load_into_strategy", "full_state_dict", "load_model_weights"]
