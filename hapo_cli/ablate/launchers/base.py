"""The launcher seam: where an ablation's training runs go (this machine, Slurm, Ray).

A launcher is one module that declares its config section (pydantic, extra="forbid") and
registers itself; the ablation asks it to `check()` (before anything is written), `submit()`
runs, report each job's `states()`, and nothing else. Job states are one of QUEUED, RUNNING or
GONE (finished: the run directory's manifest then says done, failed or interrupted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ...errors import HapoError

QUEUED, RUNNING, GONE = "queued", "running", "gone"


class LauncherError(HapoError):
    """A launcher that cannot be used as configured: one line, exit 2, nothing submitted."""


class LauncherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Submission:
    """One run to hand to the cluster: the `hapo train` command and where it logs."""

    name: str  # the run directory's name, e.g. 'AB-s1'
    command: list[str]  # python -m hapo_cli.cli train --recipe ... --output ... --resume
    env: dict[str, str]  # environment additions (threads, PYTHONPATH)
    log_path: Path
    attempt: int
    starts_left: int = 1  # starts this job may make, its first included (--max-attempts)


class Launcher:
    """Base of the cluster launchers (the local one is the ablation's own scheduler)."""

    name: ClassVar[str]
    Config: ClassVar[type[LauncherConfig]]

    def __init__(self, cfg: LauncherConfig, ablation_dir: Path) -> None:
        self.cfg, self.ablation_dir = cfg, Path(ablation_dir)

    def check(self) -> None:
        """Raise LauncherError (one line) when jobs cannot be submitted."""

    def submit(self, subs: Sequence[Submission]) -> list[str]:
        """Submit every run (Slurm: one array); returns each one's job id, in order."""
        raise NotImplementedError

    def states(self, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """(QUEUED | RUNNING | GONE, restarts by the cluster) of each job id."""
        raise NotImplementedError

    def threads(self) -> int | None:
        """torch threads of each run (the CPUs a run is given), None to keep the recipe's."""
        return None

    def record(self) -> dict[str, Any]:
        """What `hapo ablate status` needs to query the jobs again (ablation.json)."""
        return {"name": self.name, **self.cfg.model_dump(mode="json")}


_REGISTRY: dict[str, type[Launcher]] = {}


def register_launcher(name: str) -> Callable[[type[Launcher]], type[Launcher]]:
    def deco(cls: type[Launcher]) -> type[Launcher]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def launcher_names() -> tuple[str, ...]:
    return ("local", *_REGISTRY)


def launcher_class(name: str) -> type[Launcher]:
    if name not in _REGISTRY:
        raise LauncherError(f"--launcher {name!r} is not one of: {', '.join(launcher_names())}")
    return _REGISTRY[name]


def load_launcher(name: str, config: Path | dict | None, ablation_dir: Path) -> Launcher | None:
    """The launcher `name` configured by the `<name>:` section of `config` (a YAML file or a
    dict; unknown keys and sections are errors); None for `local`."""
    import yaml
    from pydantic import ValidationError

    data: Any = {}
    where = "--launcher-config"
    if isinstance(config, dict):
        data = config
    elif config is not None:
        where = str(config)
        try:
            data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise LauncherError(f"--launcher-config {config}: cannot be read ({exc.strerror})") \
                from None
        except yaml.YAMLError as exc:
            raise LauncherError(f"--launcher-config {config}: not YAML "
                                f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LauncherError(f"{where}: expected a mapping of launcher sections (slurm:, ray:)")
    unknown = [k for k in data if k not in _REGISTRY]
    if unknown:
        raise LauncherError(f"{where}: unknown section {unknown[0]!r}; sections: "
                            f"{', '.join(_REGISTRY)}")
    if name == "local":
        return None
    cls = launcher_class(name)
    section = data.get(name) or {}
    try:
        cfg = cls.Config.model_validate(section)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise LauncherError(f"{where}: {name}.{field}: {err['msg']} "
                            f"(got {err.get('input')!r})") from None
    return cls(cfg, ablation_dir)
