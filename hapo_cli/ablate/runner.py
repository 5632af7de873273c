"""Running one training process: the job, the runner protocol (tests inject a fake), the
subprocess runner, each child's environment (threads, GPU), worker slots, and reading a
running job's progress (metrics.jsonl tail) and its error (last log line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from analysis import schema

from ..errors import HapoError
from .plan import PlanEntry


@dataclass(frozen=True)
class Job:
    """One training process to start."""

    name: str  # = run_dir name, e.g. 'AB-s1'
    variant: str
    seed: int
    run_dir: Path
    recipe_path: Path  # resolved recipe YAML of this run
    log_path: Path
    env: dict[str, str]  # environment additions: threads, GPU
    pass_fds: tuple[int, ...] = ()  # the ablation lock, so it lives as long as the process


class RunHandle(Protocol):
    def poll(self) -> int | None:
        """Exit code once finished (negative: killed by that signal), None while running."""

    def terminate(self) -> None:
        """Ask the process to stop (interrupt of the ablation)."""


class Runner(Protocol):
    def start(self, job: Job) -> RunHandle: ...


def train_command(job: Job) -> list[str]:
    """`python -m hapo_cli.cli train --recipe <plan yaml> --output <run dir> --resume`."""
    return [
        sys.executable, "-m", "hapo_cli.cli", "train",
        "--recipe", str(job.recipe_path), "--output", str(job.run_dir), "--resume",
    ]  # fmt: skip


class _ProcessHandle:
    def __init__(self, proc: subprocess.Popen, log) -> None:
        self.proc, self.log = proc, log

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self.log.closed:
            self.log.close()
        return rc

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()


@dataclass
class SubprocessRunner:
    """Runs each job as a child process in the ablation's process group (a kill of the group
    stops everything), stdout and stderr appended to the job's log file."""

    command: Callable[[Job], list[str]] = train_command

    def start(self, job: Job) -> RunHandle:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log_path, "ab")  # noqa: SIM115 - closed by the handle
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.name}\n".encode())
        log.flush()
        env = {**os.environ, **job.env}
        proc = subprocess.Popen(
            self.command(job),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=job.pass_fds,
        )
        return _ProcessHandle(proc, log)


def child_env(threads: int, gpu: str | None) -> dict[str, str]:
    """Environment additions of one training process."""
    pkg_root = str(Path(__file__).resolve().parents[2])  # the folder holding hapo_cli/
    path = os.environ.get("PYTHONPATH", "")
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": pkg_root + (os.pathsep + path if path else ""),
    }
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def visible_gpus() -> list[str]:
    """GPU ids a child may be given: CUDA_VISIBLE_DEVICES if set, else torch's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU only
        return []


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def slot_resources(
    workers: int, cores: int, gpus: Sequence[str]
) -> list[tuple[int, str | None]]:
    """(threads, GPU id or None) of each worker slot: a fair share of the cores each, and one
    GPU each (round robin) where several GPUs are visible."""
    if workers < 1:
        raise HapoError(f"--workers must be >= 1, got {workers}")
    threads = max(1, cores // workers)
    use_gpus = len(gpus) > 1
    return [(threads, gpus[i % len(gpus)] if use_gpus else None) for i in range(workers)]


# ---------------------------------------------------------------------------------------------
# progress of a run: tail of metrics.jsonl
# ---------------------------------------------------------------------------------------------


class MetricsTail:
    """Reads a growing metrics.jsonl incrementally: last step and latest validation values."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.partial = b""
        self.step: int | None = None
        self.val: dict[str, float] = {}
        self.error: str | None = None

    def update(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self.offset:  # rewritten on resume (truncated to the checkpoint)
            self.offset, self.partial, self.step, self.val = 0, b"", None, {}
        if size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(row, dict):
                continue
            if isinstance(row.get(schema.STEP), int):
                self.step = row[schema.STEP]
            vals = {k: v for k, v in row.items() if schema.is_val_metric(k)}
            if vals:
                self.val = vals
            if isinstance(row.get("error"), str):
                self.error = row["error"]

    def val_text(self) -> str:
        parts = []
        for k, v in self.val.items():
            parsed = schema.parse_val_metric(k)
            if parsed and parsed[1].startswith("avg@") and isinstance(v, (int, float)):
                parts.append(f"{v:.3f}")
        return " ".join(parts) or "—"


def last_error_line(log_path: Path, limit: int = 64 * 1024) -> str | None:
    """The last non-empty line of a log (its stderr ends with the error), ANSI codes removed."""
    import re

    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("=== ")]
    return lines[-1][:500] if lines else None


@dataclass
class ActiveRun:
    """A started job, while it runs: its plan entry, process handle, worker slot, progress."""

    entry: PlanEntry
    handle: RunHandle
    slot: int
    tail: MetricsTail
    started: float
    resumed_from: int | None


def exit_error(rc: int, log_path: Path) -> str:
    """The error of a run that exited with `rc`: the signal or the last line of its log."""
    line = last_error_line(log_path) if log_path.is_file() else None
    if rc < 0:
        import signal

        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = str(-rc)
        return f"killed by {sig}" + (f" (last output: {line})" if line else "")
    return line or f"exit code {rc}"

