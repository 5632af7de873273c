"""Ray through its Jobs SDK: one job per run (`entrypoint_num_cpus/gpus`, custom resources),
submitted to a running cluster's dashboard address. Ray runs a job once; `stop_job` sends
SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S): the run checkpoints and ends
`interrupted`, and the ablation (or its rerun) submits the next attempt."""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Sequence

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
    address: str = Field("http://127.0.0.1:8265", description="The cluster's dashboard (Jobs "
                         "API) address.")
    num_cpus: float = Field(1, ge=0, description="CPUs of one run (entrypoint_num_cpus); also "
                            "its torch threads.")
    num_gpus: float = Field(0, ge=0, description="GPUs of one run (entrypoint_num_gpus).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources "
                                        "of one run (entrypoint_resources).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of each "
                                "run.")
    setup: list[str] = Field(default_factory=list, description="Shell lines before the run "
                             "(source venv/bin/activate).")
    timeout_s: float = Field(30, gt=0, description="Deadline for the Jobs API to answer.")


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
        for s in subs:
            run = shlex.join(s.command) + f" >> {shlex.quote(str(s.log_path))} 2>&1"
            # exec: Ray's SIGTERM reaches `hapo train` itself, not a shell in between
            line = "; ".join([*self.cfg.setup, "exec " + run]) if self.cfg.setup else "exec " + run
            sid = f"hapo-{self.ablation_dir.name}-{s.name}-a{s.attempt}-{uuid.uuid4().hex[:6]}"
            ids.append(client.submit_job(
                entrypoint=f"bash -c {shlex.quote(line)}", submission_id=sid,
                runtime_env={"env_vars": {**s.env, **self.cfg.env}},
                entrypoint_num_cpus=self.cfg.num_cpus, entrypoint_num_gpus=self.cfg.num_gpus,
                entrypoint_resources=dict(self.cfg.resources) or None,
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
