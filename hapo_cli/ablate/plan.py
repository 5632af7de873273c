"""The plan and its state: plan entries, ablation.json, the directory lock, each run's
resolved recipe (through the recipe loader) and what to do with each run on (re)start.

``ablation.json`` (analysis.schema.ABLATION) holds the plan (the union of every invocation's)
and the ablation's record of each run (status, error, attempts, exit code, last step).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis import schema

from ..components import SWITCHES
from ..errors import HapoError
from ..recipe import Recipe, load_recipe, stable_hash
from .grid import Variant

PLANS_DIR = ".plans"
LOGS_DIR = "logs"
LOCK_FILE = ".ablation.lock"
FORMAT_VERSION = 1

# ablation.json run statuses: the run-directory ones plus the ablation's own bookkeeping.
PLANNED, RUNNING, DONE, FAILED, INTERRUPTED = "planned", "running", "done", "failed", "interrupted"
QUEUED = "queued"  # submitted to a cluster, not started yet

_SWITCH_KEYS = {f"algo.{f}" for f in SWITCHES.values()}
# Fields that may change between invocations of one ablation without making it another one.
_HASH_EXCLUDED = (("train", "max_steps"), ("train", "threads"))


@dataclass(frozen=True)
class PlanEntry:
    """One planned run: a variant at a seed, in subfolder `run_dir` of the ablation."""

    variant: str
    seed: int
    run_dir: str
    components: str
    overrides: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "seed": self.seed,
            "run_dir": self.run_dir,
            "components": self.components,
            "overrides": list(self.overrides),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanEntry:
        variant, seed = str(d["variant"]), int(d["seed"])
        return cls(
            variant=variant,
            seed=seed,
            run_dir=str(d.get("run_dir") or schema.ablation_run_dir(variant, seed)),
            components=str(d.get("components") or variant),
            overrides=tuple(d.get("overrides") or ()),
        )


def build_plan(variants: Sequence[Variant], seeds: Sequence[int]) -> list[PlanEntry]:
    """Seed-major (every variant of the first seed first), so partial results compare."""
    return [
        PlanEntry(v.name, s, schema.ablation_run_dir(v.name, s), v.letters, v.overrides)
        for s in seeds
        for v in variants
    ]


# ---------------------------------------------------------------------------------------------
# ablation.json
# ---------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """The ablation's record of one run (the run directory's manifest is the learner's)."""

    status: str = PLANNED
    error: str | None = None
    attempts: int = 0
    rc: int | None = None
    step: int | None = None
    started: float | None = None
    ended: float | None = None
    log: str | None = None
    job_id: str | None = None  # the cluster's job of the latest attempt (Slurm, Ray)
    restarts: int = 0  # requeues of that job by the cluster itself (Slurm's Restarts)

    @property
    def attempt(self) -> int:
        """Starts so far: the ablation's submissions plus the cluster's own requeues."""
        return self.attempts + self.restarts

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class AblationSpec:
    """Contents of ablation.json: the plan (union of every invocation's) and run records."""

    name: str
    recipe: str
    recipe_hash: str
    overrides: list[str]
    plan: list[PlanEntry]
    runs: dict[str, RunState] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    updated: float | None = None
    launcher: dict[str, Any] | None = None  # name + config of the launcher the runs went to

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "launcher": self.launcher,
            "name": self.name,
            "recipe": self.recipe,
            "recipe_hash": self.recipe_hash,
            "overrides": list(self.overrides),
            "created": self.created,
            "updated": self.updated,
            "plan": [e.to_json() for e in self.plan],
            "runs": {k: asdict(v) for k, v in self.runs.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AblationSpec:
        return cls(
            name=str(d.get("name") or ""),
            recipe=str(d.get("recipe") or ""),
            recipe_hash=str(d.get("recipe_hash") or ""),
            overrides=list(d.get("overrides") or []),
            plan=[PlanEntry.from_json(e) for e in d.get("plan") or []],
            runs={k: RunState.from_json(v) for k, v in (d.get("runs") or {}).items()},
            created=float(d.get("created") or time.time()),
            updated=d.get("updated"),
            launcher=d.get("launcher") if isinstance(d.get("launcher"), dict) else None,
        )

    def state(self, run_dir: str) -> RunState:
        return self.runs.setdefault(run_dir, RunState())


def read_ablation(ablation_dir: Path) -> AblationSpec | None:
    """The spec in `ablation_dir`, or None when there is none yet."""
    path = Path(ablation_dir) / schema.ABLATION
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return AblationSpec.from_json(data)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            RecursionError) as exc:
        raise HapoError(f"{path}: not a readable ablation spec ({exc})") from None


def write_ablation(ablation_dir: Path, spec: AblationSpec) -> None:
    """Write ablation.json atomically (temporary file + rename)."""
    from ..runlog import atomic_write_text

    spec.updated = time.time()
    atomic_write_text(Path(ablation_dir) / schema.ABLATION, json.dumps(spec.to_json(), indent=2))


def merge_plan(existing: AblationSpec | None, new: AblationSpec) -> AblationSpec:
    """The spec to continue with: `new` if nothing is there; else the stored one with any new
    plan entries appended. A different recipe (hash) is an error: nothing is touched."""
    if existing is None:
        return new
    if existing.recipe_hash != new.recipe_hash:
        raise HapoError(
            f"ablation '{existing.name}' was planned with another recipe (recipe "
            f"{existing.recipe!r}, --set {existing.overrides or 'none'}; hash "
            f"{existing.recipe_hash} vs {new.recipe_hash}); use the same recipe and --set, or "
            "another --output"
        )
    have = {e.run_dir for e in existing.plan}
    existing.plan += [e for e in new.plan if e.run_dir not in have]
    return existing


def recipe_hash(recipe: Recipe) -> str:
    """Hash of a resolved recipe, ignoring fields an ablation may change between invocations
    (train.max_steps: extend the runs; train.threads: a different --workers)."""
    dump = recipe.model_dump(mode="json")
    for section, key in _HASH_EXCLUDED:
        dump.get(section, {}).pop(key, None)
    return stable_hash(dump)


# ---------------------------------------------------------------------------------------------
# what to do with each run (pure given the files)
# ---------------------------------------------------------------------------------------------


read_manifest = schema.read_manifest  # the one manifest reader (learner, ablate, analysis)


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (`checkpoints/step-NNNNNN/`), None if none
    (temporaries, `.step-NNNNNN.tmp`, are not checkpoints)."""
    root = Path(run_dir) / schema.CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = [s for p in root.iterdir() if p.is_dir()
             and (s := schema.checkpoint_step(p.name)) is not None]
    return max(steps) if steps else None


def decide(
    manifest: dict[str, Any], recorded: RunState, max_steps: int, retry_failed: bool,
    max_attempts: int | None = None,
) -> str:
    """'done' (skip: finished), 'failed' (skip: failed, not retried) or 'run' (start fresh
    or resume from the last checkpoint: `train --resume` does either).

    Finished = the run directory's manifest says done and reached `max_steps` (a larger
    --max-steps extends it). Failed = the ablation recorded a failure or the manifest says
    failed. Anything else (planned, running when killed, interrupted: preempted, time limit,
    a lost node) runs, unless it has used `max_attempts` starts: then it failed (the error
    says so; --retry-failed starts the count again).
    """
    status = manifest.get("status")
    final_step = manifest.get("final_step")
    if status == schema.STATUS_DONE and (final_step is None or int(final_step) >= max_steps):
        return DONE
    if (recorded.status == FAILED or status == schema.STATUS_FAILED) and not retry_failed:
        return FAILED
    if max_attempts is not None and recorded.attempt >= max_attempts and not retry_failed:
        return FAILED
    return "run"


# ---------------------------------------------------------------------------------------------
# each run's recipe, through the recipe loader
# ---------------------------------------------------------------------------------------------


def run_recipe(
    recipe: str | Path, overrides: Sequence[str], entry: PlanEntry, threads: int | None = None
) -> Recipe:
    """The resolved recipe of one planned run, built by `load_recipe` (so validated like any
    other): the ablation's recipe with the variant's component letters, the user's `--set`,
    the variant's own overrides (e.g. `algo.entropy_norm=released`), `train.threads=<threads>`
    when given, and the run's seed."""
    sets = [*overrides, *entry.overrides]
    if threads is not None:
        sets.append(f"train.threads={int(threads)}")
    return load_recipe(recipe, sets, components=entry.components, seed=entry.seed)


def check_overrides(overrides: Sequence[str]) -> None:
    """The user's `--set` must leave the component switches to the ablation."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _SWITCH_KEYS:
            raise HapoError(
                f"--set {item!r}: the ablation sets the component switches itself; choose "
                "variants with --components, --grid or --variants"
            )


def user_sets_threads(overrides: Sequence[str]) -> bool:
    return any(item.split("=", 1)[0].strip() == "train.threads" for item in overrides)


def existing_threads(run_dir: Path) -> int | None:
    """train.threads of a run already started (kept on resume: its recipe must not change)."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / schema.RECIPE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    threads = (data.get("train") or {}).get("threads") if isinstance(data, dict) else None
    return int(threads) if isinstance(threads, int) else None


def threads_for(run_dir: Path, share: int, user_threads: bool) -> int | None:
    """The run's thread count: the one it started with when resuming, else the user's --set
    train.threads (None: already in the overrides), else the worker's fair `share`."""
    existing = existing_threads(run_dir)
    if existing is not None:
        return existing
    return None if user_threads else share


# ---------------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------------


def take_lock(ablation_dir: Path) -> int:
    """Take the ablation's exclusive lock (non-blocking); returns the fd (inheritable, so
    the training processes hold it as long as they live)."""
    fd = os.open(Path(ablation_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HapoError(
            f"{ablation_dir}: in use by another `hapo ablate` (or training processes it started "
            "are still running); wait for them or stop them, then rerun"
        ) from None
    os.set_inheritable(fd, True)
    return fd
