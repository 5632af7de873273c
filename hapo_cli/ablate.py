"""`hapo ablate`: HAPO's component ablation grid, resumable, one training process per run.

    expand_variants(components, grid, variants, compare_released) -> [Variant]   pure
    build_plan(variants, seeds) -> [PlanEntry]                                    pure
    run_ablation(recipe=..., components=..., ...) -> bool (every planned run done)
    show_summary(ablation_dir, console) -> summary DataFrame (also written as CSV + markdown)

An ablation directory ``results/<name>/`` holds ``ablation.json`` (analysis.schema.ABLATION:
the plan and each run's status and error), one run directory per variant x seed
(``<variant>-s<seed>``), the resolved recipe of each run under ``.plans/`` and its console
output under ``logs/``. Every run is a subprocess ``python -m hapo_cli.cli train --recipe
.plans/<run>.yaml --output <run> --resume``, so a rerun of the same command continues every
interrupted run from its last checkpoint; finished runs are skipped and failed ones are kept
failed unless ``retry_failed``. The directory is locked (fcntl) while the ablation or any of
its training processes lives, so two ablations never write the same run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

from analysis import schema

from .components import LETTERS, SWITCHES, parse_components
from .errors import HapoError
from .recipe import Recipe, RecipeError, load_recipe

GRIDS: tuple[str, ...] = ("paper", "single", "leave-one-out", "all")
BASELINE = schema.BASELINE_VARIANT  # "none"
RELEASED_SUFFIX = "-released"
RELEASED_OVERRIDE = "algo.entropy_norm=released"
PLANS_DIR = ".plans"
LOGS_DIR = "logs"
LOCK_FILE = ".ablation.lock"
FORMAT_VERSION = 1

# ablation.json run statuses: the run-directory ones plus the ablation's own bookkeeping.
PLANNED, RUNNING, DONE, FAILED, INTERRUPTED = "planned", "running", "done", "failed", "interrupted"

_SWITCH_KEYS = {f"algo.{f}" for f in SWITCHES.values()}
# Fields that may change between invocations of one ablation without making it another one.
_HASH_EXCLUDED = (("train", "max_steps"), ("train", "threads"))


# ---------------------------------------------------------------------------------------------
# grid expansion (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of the grid: its name, its component letters and extra overrides."""

    name: str
    letters: str  # canonical letters ("ABD") or "none"
    overrides: tuple[str, ...] = ()


def parse_letters(components: str) -> str:
    """`--components`: 'ABCD', 'bd', 'A,C' -> canonical letters; at least one letter."""
    try:
        letters = parse_components(components)
    except RecipeError as exc:
        raise HapoError(str(exc)) from None
    if letters == BASELINE:
        raise HapoError(
            f"--components {components!r}: name at least one of the letters ABCD to ablate"
        )
    return letters


def _order_key(letters: str) -> tuple[int, list[int]]:
    """Baseline first, then by number of letters, then in canonical letter order."""
    if letters == BASELINE:
        return (0, [])
    return (len(letters), [LETTERS.index(c) for c in letters])


def _name(subset: Sequence[str]) -> str:
    return "".join(subset) or BASELINE


def grid_variants(letters: str, grid: str) -> list[str]:
    """The variant names of a grid over `letters` (canonical, e.g. 'ABCD').

    paper: baseline, each letter alone, all but one, all. single: baseline, each letter alone.
    leave-one-out: baseline, all but one, all. all: every subset (2^n variants).
    Sorted baseline first, then by size, then in canonical letter order; no duplicates.
    """
    n = len(letters)
    sizes = {
        "paper": {0, 1, n - 1, n},
        "single": {0, 1},
        "leave-one-out": {0, n - 1, n},
        "all": set(range(n + 1)),
    }
    if grid not in sizes:
        raise HapoError(f"--grid {grid!r} is not one of: {', '.join(GRIDS)}")
    names = {_name(c) for k in sizes[grid] if 0 <= k <= n for c in combinations(letters, k)}
    return sorted(names, key=_order_key)


def parse_variants(spec: str, letters: str) -> list[str]:
    """`--variants none,B,AB,ABCD` -> canonical names in the given order, baseline first.

    Every letter must be among `letters` (the `--components`); duplicates are dropped.
    """
    items = [s.strip() for s in spec.split(",")]
    if not any(items):
        raise HapoError(f"--variants {spec!r}: expected a comma list such as none,B,AB,ABCD")
    out: list[str] = []
    for raw in items:
        if not raw:
            raise HapoError(f"--variants {spec!r}: empty entry (two commas in a row?)")
        try:
            name = parse_components(raw)
        except RecipeError:
            raise HapoError(
                f"--variants {spec!r}: {raw!r} is not a variant; use letters of ABCD or 'none'"
            ) from None
        outside = [c for c in name if name != BASELINE and c not in letters]
        if outside:
            raise HapoError(
                f"--variants {spec!r}: {raw!r} uses {''.join(outside)}, which is not in "
                f"--components {letters}"
            )
        if name not in out:
            out.append(name)
    return sorted(out, key=lambda v: v != BASELINE)  # stable: only moves the baseline first


def expand_variants(
    components: str = "ABCD",
    grid: str = "paper",
    variants: str | None = None,
    compare_released: bool = False,
) -> list[Variant]:
    """`--components`, `--grid` or `--variants`, `--compare-released` -> the variants to run.

    `--compare-released` adds the full method (all of `components`) with the released code's
    entropy normalisation (`algo.entropy_norm=released`), named e.g. 'ABCD-released'.
    """
    letters = parse_letters(components)
    names = parse_variants(variants, letters) if variants is not None else grid_variants(
        letters, grid
    )
    out = [Variant(name, name) for name in names]
    if compare_released:
        out.append(Variant(letters + RELEASED_SUFFIX, letters, (RELEASED_OVERRIDE,)))
    return out


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """`--seeds 1,2,3` -> [1, 2, 3]: non-negative integers, duplicates dropped, order kept."""
    if not isinstance(spec, str):
        spec = ",".join(str(s) for s in spec)
    out: list[int] = []
    for raw in spec.split(","):
        raw = raw.strip()
        try:
            seed = int(raw)
        except ValueError:
            raise HapoError(
                f"--seeds {spec!r}: {raw!r} is not an integer; expected e.g. --seeds 1,2,3"
            ) from None
        if seed < 0:
            raise HapoError(f"--seeds {spec!r}: seeds must be >= 0, got {seed}")
        if seed not in out:
            out.append(seed)
    return out


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

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
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
    from .runlog import atomic_write_text

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
    blob = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# what to do with each run (pure given the files)
# ---------------------------------------------------------------------------------------------


def read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        obj = json.loads((Path(run_dir) / schema.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (`checkpoints/step-NNNNNN/`), None if none."""
    root = Path(run_dir) / schema.CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and not p.name.startswith("."):
            try:
                steps.append(int(p.name.split("-", 1)[1]))
            except ValueError:
                continue
    return max(steps) if steps else None


def decide(
    manifest: dict[str, Any], recorded: RunState, max_steps: int, retry_failed: bool
) -> str:
    """'done' (skip: finished), 'failed' (skip: failed, not retried) or 'run' (start fresh
    or resume from the last checkpoint: `train --resume` does either).

    Finished = the run directory's manifest says done and reached `max_steps` (a larger
    --max-steps extends it). Failed = the ablation recorded a failure or the manifest says
    failed. Anything else (planned, running when killed, interrupted) runs.
    """
    status = manifest.get("status")
    final_step = manifest.get("final_step")
    if status == schema.STATUS_DONE and (final_step is None or int(final_step) >= max_steps):
        return DONE
    if (recorded.status == FAILED or status == schema.STATUS_FAILED) and not retry_failed:
        return FAILED
    return "run"


# ---------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------


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
    pkg_root = str(Path(__file__).resolve().parent.parent)
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


# ---------------------------------------------------------------------------------------------
# the ablation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Active:
    entry: PlanEntry
    handle: RunHandle
    slot: int
    tail: MetricsTail
    started: float
    resumed_from: int | None


def _lock(ablation_dir: Path) -> int:
    """Take the ablation's exclusive lock (non-blocking); returns the fd (inheritable)."""
    fd = os.open(ablation_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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


def _check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _SWITCH_KEYS:
            raise HapoError(
                f"--set {item!r}: the ablation sets the component switches itself; choose "
                "variants with --components, --grid or --variants"
            )


def _user_threads(overrides: Sequence[str]) -> bool:
    return any(item.split("=", 1)[0].strip() == "train.threads" for item in overrides)


def _existing_threads(run_dir: Path) -> int | None:
    """train.threads of a run already started (kept on resume: its recipe must not change)."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / schema.RECIPE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    threads = (data.get("train") or {}).get("threads") if isinstance(data, dict) else None
    return int(threads) if isinstance(threads, int) else None


def run_ablation(
    *,
    recipe: str,
    components: str = "ABCD",
    grid: str = "paper",
    variants: str | None = None,
    seeds: str | Sequence[int] = "1",
    overrides: Sequence[str] = (),
    compare_released: bool = False,
    output: Path | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    max_steps: int | None = None,
    console: Any = None,
    runner: Runner | None = None,
    poll_interval: float = 0.5,
    summary: bool = True,
) -> bool:
    """Plan, run (resumably) and summarise an ablation. True when every planned run is done.

    Validates everything (grid, seeds, every variant's recipe, the stored plan) before
    writing anything. `runner` defaults to `SubprocessRunner()` (tests inject a fake).
    """
    from rich.console import Console

    console = console or Console()
    variant_list = expand_variants(components, grid, variants, compare_released)
    seed_list = parse_seeds(seeds)
    user_overrides = list(overrides)
    _check_overrides(user_overrides)
    if max_steps is not None:
        if max_steps < 0:
            raise HapoError(f"--max-steps must be >= 0, got {max_steps}")
        user_overrides.append(f"train.max_steps={max_steps}")
    slots = slot_resources(workers, available_cores(), visible_gpus())

    base = load_recipe(recipe, user_overrides, components=BASELINE, seed=0)
    ablation_dir = Path(output) if output is not None else (
        Path(base.log.output_dir) / f"{base.name}-ablation"
    )
    plan = build_plan(variant_list, seed_list)
    planned = AblationSpec(ablation_dir.name, str(recipe), recipe_hash(base), user_overrides, plan)
    # Resolve every run's recipe now: a bad --set fails before anything is written.
    resolved = {
        e.run_dir: load_recipe(recipe, [*user_overrides, *e.overrides], e.components, e.seed)
        for e in plan
    }
    spec = merge_plan(read_ablation(ablation_dir), planned)

    ablation_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(ablation_dir)
    try:
        spec = merge_plan(read_ablation(ablation_dir), planned)  # again, under the lock
        return _run_locked(
            spec, plan, resolved, ablation_dir, slots, user_overrides, retry_failed, lock_fd,
            runner or SubprocessRunner(), console, poll_interval, summary,
        )
    finally:
        os.close(lock_fd)


def _run_locked(
    spec: AblationSpec,
    plan: list[PlanEntry],
    resolved: dict[str, Recipe],
    ablation_dir: Path,
    slots: list[tuple[int, str | None]],
    user_overrides: list[str],
    retry_failed: bool,
    lock_fd: int,
    runner: Runner,
    console: Any,
    poll_interval: float,
    summary: bool,
) -> bool:
    # ---- decide what runs ----
    todo: list[PlanEntry] = []
    for e in plan:
        st = spec.state(e.run_dir)
        manifest = read_manifest(ablation_dir / e.run_dir)
        action = decide(manifest, st, resolved[e.run_dir].train.max_steps, retry_failed)
        if action == DONE:
            st.status, st.error = DONE, None
            st.step = manifest.get("final_step", st.step)
        elif action == FAILED:
            st.status = FAILED
            st.error = st.error or manifest.get("message") or "failed"
        else:
            todo.append(e)
            st.status = INTERRUPTED if st.status in (RUNNING, INTERRUPTED) else PLANNED
    write_ablation(ablation_dir, spec)
    n_done = sum(spec.state(e.run_dir).status == DONE for e in plan)
    n_failed = sum(spec.state(e.run_dir).status == FAILED for e in plan)
    console.print(
        f"ablation [bold]{spec.name}[/bold] ({ablation_dir}): {len(plan)} runs, {n_done} done, "
        f"{n_failed} failed{' (kept: --retry-failed reruns them)' if n_failed else ''}, "
        f"{len(todo)} to run, {len(slots)} worker(s) x {slots[0][0]} thread(s)",
        highlight=False,
    )

    if todo:
        _prepare_shared_policy(resolved[todo[0].run_dir], console)
        _schedule(spec, todo, resolved, ablation_dir, slots, user_overrides, lock_fd, runner,
                  console, poll_interval)

    ok = all(spec.state(e.run_dir).status == DONE for e in plan)
    if summary:
        try:
            show_summary(ablation_dir, console=console)
        except (HapoError, ValueError, KeyError) as exc:  # a summary problem must not hide runs
            console.print(f"[yellow]summary not available:[/yellow] {exc}", highlight=False)
    failed = [e.run_dir for e in plan if spec.state(e.run_dir).status == FAILED]
    for name in failed:
        console.print(f"[red]failed[/red] {name}: {spec.state(name).error}", highlight=False)
    return ok


def _prepare_shared_policy(recipe: Recipe, console: Any) -> None:
    """Build the shared warm-up policy once, here, before any worker starts (every variant
    and seed of the ablation starts from it: its cache key is model + data only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .models import resolve_policy_path

    with Progress(TextColumn("shared warm-up"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("warm-up", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        path = resolve_policy_path(recipe.model, recipe.data, progress=progress)
    console.print(f"initial policy: {path}", highlight=False)


def _plan_recipe(
    entry: PlanEntry, recipe: Recipe, run_dir: Path, threads: int, user_threads: bool
) -> Recipe:
    """The run's recipe with its thread count: the one it started with when resuming, else
    the user's --set train.threads, else the worker's fair share."""
    existing = _existing_threads(run_dir)
    if existing is not None:
        chosen = existing
    elif user_threads:
        return recipe
    else:
        chosen = threads
    if recipe.train.threads == chosen:
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"threads": chosen})})


def _schedule(
    spec: AblationSpec,
    todo: list[PlanEntry],
    resolved: dict[str, Recipe],
    ablation_dir: Path,
    slots: list[tuple[int, str | None]],
    user_overrides: list[str],
    lock_fd: int,
    runner: Runner,
    console: Any,
    poll_interval: float,
) -> None:
    from .runlog import atomic_write_text

    pending = list(todo)
    active: dict[int, _Active] = {}
    finished: list[str] = []
    user_threads = _user_threads(user_overrides)
    display = _Display(console, spec, todo, resolved)

    def start(slot: int, entry: PlanEntry) -> None:
        threads, gpu = slots[slot]
        run_dir = ablation_dir / entry.run_dir
        rec = _plan_recipe(entry, resolved[entry.run_dir], run_dir, threads, user_threads)
        recipe_path = ablation_dir / PLANS_DIR / f"{entry.run_dir}.yaml"
        atomic_write_text(recipe_path, rec.to_yaml())
        log_path = ablation_dir / LOGS_DIR / f"{entry.run_dir}.log"
        job = Job(
            name=entry.run_dir, variant=entry.variant, seed=entry.seed,
            run_dir=run_dir.resolve(), recipe_path=recipe_path.resolve(),
            log_path=log_path.resolve(), env=child_env(rec.train.threads or threads, gpu),
            pass_fds=(lock_fd,),
        )  # fmt: skip
        resumed_from = latest_checkpoint_step(run_dir)
        st = spec.state(entry.run_dir)
        st.status, st.error, st.rc, st.ended = RUNNING, None, None, None
        st.attempts += 1
        st.started = time.time()
        st.log = str(log_path.relative_to(ablation_dir))
        write_ablation(ablation_dir, spec)
        handle = runner.start(job)
        active[slot] = _Active(entry, handle, slot, MetricsTail(run_dir / schema.METRICS),
                               st.started, resumed_from)
        display.started(entry, resumed_from, gpu)

    def finish(slot: int, rc: int) -> None:
        a = active.pop(slot)
        a.tail.update()
        run_dir = ablation_dir / a.entry.run_dir
        manifest = read_manifest(run_dir)
        st = spec.state(a.entry.run_dir)
        st.rc, st.ended, st.step = rc, time.time(), a.tail.step
        if rc == 0 and manifest.get("status") == schema.STATUS_DONE:
            st.status, st.error = DONE, None
        else:
            st.status = FAILED
            st.error = (
                manifest.get("message") if manifest.get("status") == schema.STATUS_FAILED
                else None
            ) or _exit_error(rc, ablation_dir / (st.log or ""))
        write_ablation(ablation_dir, spec)
        finished.append(a.entry.run_dir)
        display.finished(a.entry, st, a.tail)

    try:
        with display:
            while pending or active:
                for slot in range(len(slots)):
                    if slot not in active and pending:
                        start(slot, pending.pop(0))
                for slot in list(active):
                    rc = active[slot].handle.poll()
                    if rc is not None:
                        finish(slot, rc)
                for a in active.values():
                    a.tail.update()
                display.refresh(active)
                if active:
                    time.sleep(poll_interval)
    except BaseException:
        # Ctrl-C (or any error here): stop the children, record them as interrupted so that
        # the same command resumes them; then let the exception through.
        for a in active.values():
            a.handle.terminate()
        deadline = time.time() + 30
        for a in active.values():
            while a.handle.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            st = spec.state(a.entry.run_dir)
            st.ended, st.step = time.time(), a.tail.step
        for e in todo:  # including a run whose start was interrupted
            if spec.state(e.run_dir).status == RUNNING:
                spec.state(e.run_dir).status = INTERRUPTED
        write_ablation(ablation_dir, spec)
        raise


def _exit_error(rc: int, log_path: Path) -> str:
    line = last_error_line(log_path) if log_path.is_file() else None
    if rc < 0:
        import signal

        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = str(-rc)
        return f"killed by {sig}" + (f" (last output: {line})" if line else "")
    return line or f"exit code {rc}"


# ---------------------------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------------------------


class _Display:
    """A live rich table on a terminal; one line per start/finish otherwise (logs, CI)."""

    def __init__(self, console: Any, spec: AblationSpec, todo: list[PlanEntry],
                 resolved: dict[str, Recipe]) -> None:
        self.console, self.spec, self.todo, self.resolved = console, spec, todo, resolved
        self.live_mode = bool(getattr(console, "is_terminal", False))
        self.live = None
        self.rows: dict[str, dict[str, str]] = {
            e.run_dir: {"status": "queued", "step": "", "val": "", "time": ""} for e in todo
        }
        self.t0 = time.time()

    def __enter__(self) -> _Display:
        if self.live_mode:
            from rich.live import Live

            # auto_refresh=False: no refresh thread in this process while children are forked.
            self.live = Live(self._table(), console=self.console, auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(*exc)
            self.live = None

    def _max_steps(self, run: str) -> int:
        return self.resolved[run].train.max_steps

    def started(self, entry: PlanEntry, resumed_from: int | None, gpu: str | None) -> None:
        how = f"resume from step {resumed_from}" if resumed_from else "start"
        self.rows[entry.run_dir].update(status=f"running ({how})")
        if not self.live_mode:
            where = f" on GPU {gpu}" if gpu is not None else ""
            self.console.print(f"{how} {entry.run_dir}{where}", highlight=False)

    def finished(self, entry: PlanEntry, st: RunState, tail: MetricsTail) -> None:
        took = (st.ended or 0) - (st.started or 0)
        row = self.rows[entry.run_dir]
        row.update(status=st.status, step=f"{tail.step or 0}/{self._max_steps(entry.run_dir)}",
                   val=tail.val_text(), time=f"{took:.0f}s")
        if not self.live_mode:
            color = "green" if st.status == DONE else "red"
            extra = f": {st.error}" if st.error else ""
            self.console.print(
                f"[{color}]{st.status}[/{color}] {entry.run_dir} step {row['step']} val "
                f"{row['val']} ({row['time']}){extra}",
                highlight=False,
            )

    def refresh(self, active: dict[int, _Active]) -> None:
        if self.live is None:
            return
        now = time.time()
        for a in active.values():
            self.rows[a.entry.run_dir].update(
                step=f"{a.tail.step or 0}/{self._max_steps(a.entry.run_dir)}",
                val=a.tail.val_text(), time=f"{now - a.started:.0f}s",
            )
        self.live.update(self._table(), refresh=True)

    def _table(self):
        from rich.table import Table

        done = sum(r["status"] in (DONE, FAILED) for r in self.rows.values())
        table = Table(title=f"ablation {self.spec.name}: {done}/{len(self.rows)} finished, "
                      f"{time.time() - self.t0:.0f}s")
        for col in ("run", "status", "step", "val avg@k", "time"):
            table.add_column(col)
        for e in self.todo:
            r = self.rows[e.run_dir]
            status = r["status"]
            color = {"done": "green", "failed": "red"}.get(status, "yellow"
                                                             if status.startswith("running")
                                                             else "dim")
            table.add_row(e.run_dir, f"[{color}]{status}[/{color}]", r["step"], r["val"],
                          r["time"])
        return table


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def show_summary(ablation_dir: Path, console: Any = None):
    """Print the per-variant summary table of an ablation directory and write it as
    ``summary.csv`` and ``summary.md`` there. Returns the summary DataFrame."""
    from rich.console import Console

    from analysis.summary import ablation_summary, summary_display, write_summary

    console = console or Console()
    ablation_dir = Path(ablation_dir)
    if not (ablation_dir / schema.ABLATION).is_file():
        raise HapoError(
            f"{ablation_dir}: not an ablation directory (no {schema.ABLATION}); pass the "
            "--output of a `hapo ablate` run"
        )
    try:
        df = ablation_summary(ablation_dir)
    except ValueError as exc:
        raise HapoError(str(exc).splitlines()[0]) from None
    if df.empty:
        console.print(f"{ablation_dir}: no run has started yet; nothing to summarise")
        return df
    csv_path, md_path = write_summary(df, ablation_dir)
    shown = summary_display(df)
    base = df.attrs.get("baseline")
    title = f"ablation {df.attrs.get('ablation') or ablation_dir.name}"
    caption = (f"Δ vs baseline '{base}' (± standard error); cells mean ± std over seeds"
               if base else "no baseline variant: Δ not computed")
    for table in _summary_tables(shown, title, caption, console.width):
        console.print(table)
    console.print(f"written: {csv_path}, {md_path}", highlight=False)
    return df


def _summary_tables(shown, title: str, caption: str, width: int) -> list:
    """One rich table when it fits `width`; else one per benchmark metric (variant, seeds,
    final, best, Δ) and one for the rest (status, entropy, length), so nothing is cut."""
    from rich.table import Table

    def make(cols: list[str], name: str, cap: str | None, strip: str = ""):
        t = Table(title=name, caption=cap)
        for c in cols:
            t.add_column(str(c).removeprefix(strip),
                         justify="left" if c in ("variant", "status") else "right")
        for row in shown[cols].itertuples(index=False):
            t.add_row(*("" if v is None else str(v) for v in row))
        return t

    cols = list(shown.columns)
    need = sum(max(len(str(c)), *(len(str(v)) for v in shown[c])) + 3 for c in cols) + 1
    if need <= width:
        return [make(cols, title, caption)]
    metric_cols = [c for c in cols if c.endswith((" final", " best", " Δ final"))
                   and c not in ("entropy final", "response len final")]
    keys = list(dict.fromkeys(c.rsplit(" ", 2)[0] if c.endswith(" Δ final") else
                              c.rsplit(" ", 1)[0] for c in metric_cols))
    rest = [c for c in cols if c not in metric_cols]
    tables = [make(rest, title, None)]
    for i, key in enumerate(keys):
        group = ["variant", "seeds"] + [c for c in metric_cols if c.startswith(key + " ")]
        tables.append(make(group, key, caption if i == len(keys) - 1 else None, key + " "))
    return tables


__all__ = [
    "GRIDS", "AblationSpec", "Job", "PlanEntry", "RunHandle", "RunState", "Runner",
    "SubprocessRunner", "Variant", "build_plan", "decide", "expand_variants", "grid_variants",
    "merge_plan", "parse_seeds", "parse_variants", "read_ablation", "recipe_hash",
    "run_ablation", "show_summary", "slot_resources", "train_command", "write_ablation",
]  # fmt: skip
