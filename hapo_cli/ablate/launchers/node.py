"""What a Slurm job runs on each of its nodes (submitit pickles `TrainOnNode` by reference and
calls it under `srun`, one task per node).

One node: `hapo train ... --resume` as a child process. Several nodes (or several processes a
node): `accelerate launch --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID
--main_process_ip <first node's address>` around the same command, gloo on CPU, NCCL on GPUs.

Signals: Slurm sends SIGTERM (preemption, `scontrol requeue`, `scancel`) and the `--signal`
warning (USR2, submitit's) to every process of the step; `hapo train` finishes its step, writes
a checkpoint and exits 75. submitit's own handler ignores SIGTERM (Slurm requeues a preempted
`--requeue` job itself) and on USR2 calls `checkpoint()` below, which waits for the child's
checkpoint and asks submitit to requeue the job: the next start resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # one declaration for the type checker: a base class must be one class
    from submitit.helpers import Checkpointable
else:
    try:  # on the submitting machine and the nodes alike (the `cluster` extra)
        from submitit.helpers import Checkpointable
    except ImportError:  # pragma: no cover - the launcher checks for submitit first
        Checkpointable = object

_CHILD: dict[str, subprocess.Popen] = {}  # this process's training child (for checkpoint())


def first_node_address(nodelist: str) -> str:
    """The address (NodeAddr) of the first host of a Slurm node list."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, check=True, timeout=60).stdout.split()
    out = subprocess.run(["scontrol", "show", "node", hosts[0], "-o"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    for tok in out.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1]
    return hosts[0]


def wait_exit(pid: int, timeout_s: float) -> None:
    """Until child `pid` has exited (or `timeout_s`), leaving it to be reaped. Not Popen.wait:
    this runs in a signal handler that interrupted `__call__`'s `proc.wait()`, which holds
    the Popen's wait lock, so a second wait (or poll) would never see the exit."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:  # already reaped
            return
        time.sleep(0.1)


@dataclass
class TrainOnNode(Checkpointable):
    """`train` (argv after `python -m hapo_cli.cli`) on this node, logging to `log`."""

    python: str
    train: list[str]
    env: dict[str, str]
    log: str
    processes_per_node: int = 1
    main_process_ip: str | None = None
    main_process_port: int | None = None
    starts: int = 1000  # starts of this job at most (its first included): --max-attempts
    extra: dict = field(default_factory=dict)

    def command(self) -> list[str]:
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
        if nodes == 1 and self.processes_per_node == 1:
            return [self.python, "-m", "hapo_cli.cli", *self.train]
        rank = int(os.environ.get("SLURM_NODEID", "0"))
        ip = self.main_process_ip or first_node_address(os.environ["SLURM_JOB_NODELIST"])
        port = self.main_process_port or 29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 2000
        accelerate = os.path.join(os.path.dirname(self.python), "accelerate")
        # --multi_gpu on a machine without CUDA starts gloo processes (the learner's cpu=True)
        return [accelerate, "launch", "--multi_gpu",
                "--num_processes", str(nodes * self.processes_per_node),
                "--num_machines", str(nodes), "--machine_rank", str(rank),
                "--main_process_ip", ip, "--main_process_port", str(port),
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "hapo_cli.cli", *self.train]

    def __call__(self) -> int:
        with open(self.log, "ab") as log:
            restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
            log.write(f"\n=== slurm job {os.environ.get('SLURM_JOB_ID')} node "
                      f"{os.environ.get('SLURM_NODEID', '0')} restart {restarts}\n".encode())
            log.flush()
            proc = subprocess.Popen(self.command(), env={**os.environ, **self.env}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _CHILD["proc"] = proc
            return proc.wait()

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 (the time limit is near): the child got it too; wait for its
        checkpoint, then requeue (submitit runs `scontrol requeue`), unless this job has made
        its `starts` (then it ends; the ablation records the run as given up)."""
        proc = _CHILD.get("proc")
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGUSR2)  # a second one is ignored by `hapo train`
            wait_exit(proc.pid, float(os.environ.get("HAPO_CHECKPOINT_WAIT_S", "600")))
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) + 1 >= self.starts:
            return None  # submitit: "not requeued"
        return super().checkpoint(*args, **kwargs)
