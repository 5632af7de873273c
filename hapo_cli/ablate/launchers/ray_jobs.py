"""Ray through its Jobs SDK: one job per run (`entrypoint_num_cpus/gpus`, custom resources),
submitted to a running cluster's dashboard address; a run over `nodes` nodes is a driver
(ray_nodes.py) that places one rank on each node (accelerate launch across them). Ray runs a
job once; `stop_job` sends SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S): the run
checkpoints and ends `interrupted`, and the ablation (or its rerun) submits the next attempt."""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

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


class RayConfig(LauncherConfig):
    address: str = Field(default="http://127.0.0.1:8265",
                         description="The cluster's dashboard (Jobs "
                         "API) address.")
    num_cpus: float = Field(default=1, ge=0,
                            description="CPUs of one run (entrypoint_num_cpus); also "
                            "its torch threads.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs of one run (entrypoint_num_gpus).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources "
                                        "of one run (entrypoint_resources).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of each "
                                "run.")
    setup: list[str] = Field(default_factory=list, description="Shell lines before the run "
                             "(source venv/bin/activate).")
    timeout_s: float = Field(default=30, gt=0, description="Deadline for the Jobs API to answer.")
    nodes: int = Field(default=1, ge=1, description="Nodes of one run: one rank a node on distinct "
                       "nodes (a STRICT_SPREAD placement group), accelerate across them; "
                       "num_cpus, num_gpus and resources are then each node's.")
    processes_per_node: int | None = Field(default=None, ge=1,
                                           description="Training processes a node "
                                           "(default: num_gpus, 1 without GPUs).")
    main_process_port: int | None = Field(default=None, description="Multi-node rendezvous port "
                                          "(default: a free port on rank 0's node).")


@register_launcher("ray")
class RayLauncher(Launcher):
    Config = RayConfig
    cfg: RayConfig

    def _client(self):
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise LauncherError("--launcher ray needs Ray's Jobs SDK: pip install 'hapo[cluster]'") \
                from None
        try:
            return JobSubmissionClient(self.cfg.address)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LauncherError(f"ray.address={self.cfg.address!r}: no Ray cluster answers there "
                                f"({line[:200]})") from None

    def check(self) -> None:
        self._client()

    def threads(self) -> int | None:
        return max(1, int(self.cfg.num_cpus)) if self.cfg.num_cpus else None

    def submit(self, subs: Sequence[Submission]) -> list[str]:
        client = self._client()
        ids = []
        c = self.cfg
        per_node = c.processes_per_node or max(1, int(c.num_gpus))
        spread = c.nodes > 1 or per_node > 1
        for s in subs:
            env = {**s.env, **c.env}
            if spread:  # a driver that holds no resources: its ranks' actors hold them
                cmd = [s.command[0], str(Path(__file__).with_name("ray_nodes.py")),
                       "--nodes", str(c.nodes), "--processes-per-node", str(per_node),
                       "--num-cpus", str(c.num_cpus), "--num-gpus", str(c.num_gpus),
                       "--resources", json.dumps(dict(c.resources)), "--env", json.dumps(env),
                       "--log", str(s.log_path),
                       *(["--main-process-port", str(c.main_process_port)]
                         if c.main_process_port else []),
                       "--", *s.command[3:]]
                resources: dict = {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 0}
            else:
                cmd = s.command
                resources = {"entrypoint_num_cpus": c.num_cpus, "entrypoint_num_gpus": c.num_gpus,
                             "entrypoint_resources": dict(c.resources) or None}
            run = shlex.join(cmd) + f" >> {shlex.quote(str(s.log_path))} 2>&1"
            # exec: Ray's SIGTERM reaches `hapo train` (or the ranks' driver) itself
            line = "; ".join([*c.setup, "exec " + run]) if c.setup else "exec " + run
            sid = f"hapo-{self.ablation_dir.name}-{s.name}-a{s.attempt}-{uuid.uuid4().hex[:6]}"
            ids.append(client.submit_job(
                entrypoint=f"bash -c {shlex.quote(line)}", submission_id=sid,
                runtime_env={"env_vars": env}, **resources,
                metadata={"hapo_run": s.name, "attempt": str(s.attempt)},
            ))
        return ids

    def states(self, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        from ray.job_submission import JobStatus

        client = self._client()
        out = {}
        for j in job_ids:
            try:
                st = client.get_job_status(j)
            except RuntimeError:  # not found (another cluster, or its record was dropped)
                out[j] = (GONE, 0)
                continue
            out[j] = ({JobStatus.PENDING: QUEUED, JobStatus.RUNNING: RUNNING}.get(st, GONE), 0)
        return out
