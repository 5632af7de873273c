"""Launchers: `hapo ablate --launcher local|slurm|ray --launcher-config cluster.yaml`.

    base.py   the seam: Launcher, its config section, register_launcher, load_launcher
    slurm.py  Slurm through submitit (one job array; --requeue; --signal before the limit)
    ray_jobs.py Ray through its Jobs SDK (one job per run; the ablation resubmits)
    node.py   what a Slurm job runs on each node (`hapo train`, or `accelerate launch` across
              the job's nodes); imports no project module, so it loads fast on a node
"""

from . import ray_jobs, slurm  # noqa: F401 - registration
from .base import (
    GONE,
    QUEUED,
    RUNNING,
    Launcher,
    LauncherConfig,
    LauncherError,
    Submission,
    launcher_class,
    launcher_names,
    load_launcher,
    register_launcher,
)

__all__ = [
    "GONE", "QUEUED", "RUNNING", "Launcher", "LauncherConfig", "LauncherError", "Submission",
    "launcher_class", "launcher_names", "load_launcher", "register_launcher",
]  # fmt: skip
