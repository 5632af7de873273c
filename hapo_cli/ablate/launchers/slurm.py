"""Slurm through submitit: every run of an ablation in one job array (`--array=0-N%P`),
`--requeue` and `--signal=USR2@<signal_seconds>`; a job spans `nodes` nodes (one task each,
`accelerate launch` across them). Job states come from `scontrol show job` (no accounting
database needed: `sacct` is not used)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator

from .base import (
    GONE,
    QUEUED,
    RUNNING,
    Launcher,
    LauncherConfig,
    LauncherError,
    Submission,
    register_launcher,
)

# scontrol JobState -> ours; anything else (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
# PREEMPTED, OUT_OF_MEMORY ...) is over: the run's manifest says what happened
_ALIVE = {"PENDING": QUEUED, "REQUEUED": QUEUED, "REQUEUE_HOLD": QUEUED, "REQUEUE_FED": QUEUED,
          "CONFIGURING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING,
          "SUSPENDED": RUNNING, "RESIZING": RUNNING, "SIGNALING": RUNNING, "STAGE_OUT": RUNNING}


class SlurmConfig(LauncherConfig):
    partition: str | None = Field(default=None,
                                  description="sbatch --partition (default: the cluster's).")
    account: str | None = Field(default=None, description="sbatch --account.")
    time: str = Field(default="24:00:00",
                      description="Time limit of one job: [D-]HH:MM[:SS] or minutes; "
                      "the run checkpoints and requeues itself before it.")
    nodes: int = Field(default=1, ge=1, description="Nodes of one run (accelerate across them).")
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs of one run on each node.")
    processes_per_node: int | None = Field(default=None, ge=1, description="Training processes a "
                                           "node (default: gpus_per_node, 1 without GPUs).")
    cpus_per_task: int = Field(default=1, ge=1,
                               description="CPUs a node; also the run's torch threads.")
    mem_gb: float | None = Field(default=None, gt=0, description="Memory a node, GB.")
    setup: list[str] = Field(default_factory=list, description="Shell lines before the run "
                             "(module load, source venv/bin/activate).")
    sbatch: dict[str, Any] = Field(default_factory=dict, description="Extra sbatch options, "
                                   "e.g. {qos: high, constraint: a100}.")
    signal_seconds: int = Field(default=120, ge=10,
                                description="USR2 this long before the time limit.")
    parallel: int = Field(default=256, ge=1, description="Runs of the array running at once.")
    main_process_ip: str | None = Field(default=None, description="Multi-node rendezvous address "
                                        "(default: the first node's NodeAddr).")
    main_process_port: int | None = Field(default=None, description="Rendezvous port (default: "
                                          "29500 + job id mod 2000).")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        minutes(v)
        return v


def minutes(t: str) -> int:
    """Slurm's time forms as minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    try:
        days, _, rest = t.rpartition("-") if "-" in t else ("0", "", t)
        parts = [int(p) for p in rest.split(":")]
        if "-" in t:
            h, m, s = (parts + [0, 0])[:3]
        elif len(parts) == 3:
            h, m, s = parts
        else:
            h, (m, s) = 0, (parts + [0])[:2]
        total = int(days) * 1440 + h * 60 + m + (1 if s else 0)
    except ValueError:
        raise ValueError(f"{t!r} is not a Slurm time ([D-]HH:MM[:SS] or minutes)") from None
    if total <= 0:
        raise ValueError(f"{t!r} must be more than 0 minutes")
    return total


@register_launcher("slurm")
class SlurmLauncher(Launcher):
    Config = SlurmConfig
    cfg: SlurmConfig

    def check(self) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LauncherError("--launcher slurm needs submitit: pip install 'hapo[cluster]'") \
                from None
        for tool in ("sbatch", "scontrol", "sinfo"):
            if shutil.which(tool) is None:
                raise LauncherError(f"--launcher slurm: `{tool}` is not on PATH (no Slurm client "
                                    "here? run hapo ablate on a login node)")
        res = _run(["sinfo", "-h", "-o", "%P"])
        if res.returncode != 0:
            raise LauncherError(sinfo_failure(res.stderr, res.returncode))
        parts = [p.strip().rstrip("*") for p in res.stdout.split()]
        if self.cfg.partition and self.cfg.partition not in parts:
            raise LauncherError(f"slurm.partition={self.cfg.partition!r} is not a partition "
                                f"of this cluster: {', '.join(parts) or 'none'}")

    def threads(self) -> int | None:
        return self.cfg.cpus_per_task

    def submit(self, subs: Sequence[Submission]) -> list[str]:
        import submitit

        from .node import TrainOnNode

        c = self.cfg
        folder = self.ablation_dir / ".slurm"
        ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=1000)
        extra = {"requeue": True, **c.sbatch}
        if c.account:
            extra["account"] = c.account
        if c.mem_gb is not None:
            extra["mem"] = f"{int(c.mem_gb * 1024)}M"
        ex.update_parameters(
            job_name=f"hapo-{self.ablation_dir.name}", partition=c.partition, time=minutes(c.time),
            nodes=c.nodes, ntasks_per_node=1, cpus_per_task=c.cpus_per_task,
            gpus_per_node=c.gpus_per_node or None, setup=list(c.setup),
            signal_delay_s=c.signal_seconds, array_parallelism=c.parallel,
            stderr_to_stdout=True, additional_parameters=extra,
        )
        ppn = c.processes_per_node or max(1, c.gpus_per_node)
        jobs = []
        with ex.batch():
            for s in subs:
                fn = TrainOnNode(sys.executable, s.command[3:], s.env, str(s.log_path), ppn,
                                 c.main_process_ip, c.main_process_port, s.starts_left)
                jobs.append(ex.submit(fn))
        return [str(j.job_id) for j in jobs]

    def states(self, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        res = _run(["scontrol", "show", "job", "-o"])
        if res.returncode != 0 and "no jobs" not in (res.stdout + res.stderr).lower():
            raise LauncherError(f"`scontrol show job` failed: {_first_line(res.stderr)}")
        seen: dict[str, tuple[str, int]] = {}
        for line in res.stdout.splitlines():
            kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            state = _ALIVE.get(kv.get("JobState", ""), GONE)
            restarts = int(kv.get("Restarts", "0") or 0)
            if kv.get("ArrayJobId") and kv.get("ArrayTaskId"):
                for task in _tasks(kv["ArrayTaskId"]):
                    seen[f"{kv['ArrayJobId']}_{task}"] = (state, restarts)
            if "JobId" in kv:
                seen[kv["JobId"]] = (state, restarts)
        return {j: seen.get(j, (GONE, 0)) for j in job_ids}


def sinfo_failure(stderr: str, rc: int) -> str:
    """One line for a failed `sinfo`: munge down (Slurm's clients sign every request with
    munge), the controller unreachable, or else sinfo's own first line; with the command that
    checks it."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    munge = next((ln for ln in lines if "munge encode failed" in ln.lower()), None) or next(
        (ln for ln in lines if "munge" in ln.lower() or "authentication" in ln.lower()), None)
    if munge is not None:
        detail = munge.split("error: ", 1)[-1]
        sock = re.search(r'access "([^"]+)"', detail)
        flag = f" -S {sock.group(1)}" if sock else ""
        return (f"--launcher slurm: munge does not answer, so Slurm refuses every request "
                f"({detail}); check with `munge -n{flag} | unmunge{flag}`, start munged, rerun")
    ctld = next((ln for ln in lines if "slurm controller" in ln.lower()), None)
    if ctld is not None:
        return (f"--launcher slurm: slurmctld does not answer ({ctld}); check with `scontrol "
                f"ping` (SLURM_CONF={os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf')})")
    return (f"--launcher slurm: `sinfo` failed ({(lines or [f'exit code {rc}'])[0]}); check "
            "with `sinfo` and `scontrol ping`")


def _tasks(spec: str) -> list[str]:
    """An ArrayTaskId as task ids: '3', '0-3%2', '1,4-5'."""
    out: list[str] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise LauncherError(f"`{' '.join(cmd)}` did not answer within 60 s (slurmctld down?)") \
            from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[0] if lines else ""

