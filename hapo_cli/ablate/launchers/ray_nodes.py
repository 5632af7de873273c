"""What a multi-node Ray job runs (its Jobs SDK entrypoint, on the node Ray picks for it): one
run across `--nodes` Ray nodes, the Ray equivalent of `srun accelerate launch --num_machines
$SLURM_NNODES --machine_rank $SLURM_NODEID --main_process_ip <first node>`.

A STRICT_SPREAD placement group reserves one bundle (the run's CPUs, GPUs, custom resources)
on each of `nodes` distinct nodes; one actor in each bundle starts `accelerate launch
--num_machines N --machine_rank i --main_process_ip <rank 0's node address>` around the same
`hapo train` command and waits for it (gloo on CPU, NCCL on GPUs). Every rank appends its output
to the run's log (the ablation folder is on the shared filesystem).

Signals: Ray's `stop_job` sends this process SIGTERM; it forwards SIGTERM (and USR1/USR2) to
every rank's `hapo train`, which finishes its step, writes a checkpoint and exits 75; this
process exits with that code. Run as a script (`python ray_nodes.py ...`): it imports no
project module.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

EXIT_PREEMPTED = 75  # hapo_cli.interrupts.EXIT_PREEMPTED (not imported: no project module)


def accelerate_command(python: str, train: list[str], nodes: int, per_node: int, rank: int,
                       ip: str, port: int) -> list[str]:
    """`accelerate launch` of rank `rank`'s node (the same as node.py's on Slurm)."""
    accelerate = os.path.join(os.path.dirname(python), "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(nodes * per_node),
            "--num_machines", str(nodes), "--machine_rank", str(rank),
            "--main_process_ip", ip, "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "hapo_cli.cli", *train]


class NodeRun:
    """One node's share of the run (a Ray actor; threaded, so `signal` reaches a running
    `run`)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def where(self) -> tuple[str, int, str]:
        """This node's address, a free port on it (rank 0's is the rendezvous) and its id."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return ip, port, ray.get_runtime_context().get_node_id()

    def run(self, train: list[str], env: dict[str, str], log: str, nodes: int, per_node: int,
            rank: int, ip: str, port: int, header: str) -> int:
        cmd = accelerate_command(sys.executable, train, nodes, per_node, rank, ip, port)
        with open(log, "ab") as out:
            out.write(header.encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self.proc.wait()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--processes-per-node", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1)
    p.add_argument("--num-gpus", type=float, default=0)
    p.add_argument("--resources", default="{}", help="JSON: custom resources of each node")
    p.add_argument("--env", default="{}", help="JSON: environment of each rank")
    p.add_argument("--main-process-port", type=int, default=None)
    p.add_argument("--log", required=True)
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then `hapo train`'s arguments")
    a = p.parse_args(argv)
    train = a.train[1:] if a.train[:1] == ["--"] else a.train

    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(log_to_driver=False)  # the job's cluster (RAY_ADDRESS, set by the Jobs API)
    bundle = {k: v for k, v in {"CPU": a.num_cpus, "GPU": a.num_gpus,
                                **json.loads(a.resources)}.items() if v}
    pg = placement_group([dict(bundle) for _ in range(a.nodes)], strategy="STRICT_SPREAD")
    print(f"waiting for {a.nodes} nodes with {bundle} each", flush=True)
    ray.get(pg.ready())
    actor = ray.remote(NodeRun)
    ranks = [actor.options(num_cpus=a.num_cpus, num_gpus=a.num_gpus,
                           resources=json.loads(a.resources) or None, max_concurrency=2,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               pg, placement_group_bundle_index=i)).remote()
             for i in range(a.nodes)]
    where = ray.get([r.where.remote() for r in ranks])
    ip, port = where[0][0], a.main_process_port or where[0][1]
    job = os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id()

    def forward(signum, frame):
        for r in ranks:
            r.signal.remote(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    env = json.loads(a.env)
    refs = [r.run.remote(train, env, a.log, a.nodes, a.processes_per_node, i, ip, port,
                         f"\n=== ray job {job} rank {i} of {a.nodes} on node {w[2]} "
                         f"({w[0]}), rendezvous {ip}:{port}\n")
            for i, (r, w) in enumerate(zip(ranks, where))]
    pending = list(refs)
    while pending:  # short waits: the signal handler runs between them
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    try:
        codes = ray.get(refs)
    except RayError as exc:  # a node (its actor) died
        print(f"a rank's node was lost: {str(exc).splitlines()[0]}", flush=True)
        return EXIT_PREEMPTED
    print(f"ranks' exit codes: {codes}", flush=True)
    bad = [c for c in codes if c]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in bad else (bad[0] if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
