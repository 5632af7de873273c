"""`run_ablation`: validate and plan, take the lock, decide what runs, schedule the training
processes on the worker slots, record every start and finish in ablation.json, summarise.

Every run is a subprocess ``python -m hapo_cli.cli train --recipe .plans/<run>.yaml --output
<run> --resume``, so a rerun of the same command continues every interrupted run from its last
checkpoint; finished runs are skipped and failed ones are kept failed unless ``retry_failed``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis import schema

from ..errors import HapoError
from ..recipe import Recipe, load_recipe
from .display import Display
from .grid import BASELINE, RELEASED_OVERRIDE, cross_baselines, expand_variants, parse_seeds
from .plan import (
    DONE,
    FAILED,
    INTERRUPTED,
    LOGS_DIR,
    PLANNED,
    PLANS_DIR,
    RUNNING,
    AblationSpec,
    PlanEntry,
    build_plan,
    check_overrides,
    decide,
    latest_checkpoint_step,
    merge_plan,
    read_ablation,
    read_manifest,
    recipe_hash,
    run_recipe,
    take_lock,
    threads_for,
    user_sets_threads,
    write_ablation,
)
from .runner import (
    ActiveRun,
    Job,
    MetricsTail,
    Runner,
    SubprocessRunner,
    available_cores,
    child_env,
    exit_error,
    slot_resources,
    visible_gpus,
)
from .summary import show_summary


def run_ablation(
    *,
    recipe: str,
    components: str = "ABCD",
    grid: str = "paper",
    variants: str | None = None,
    baselines: str | None = None,
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
    launcher: str = "local",
    launcher_config: Path | dict | None = None,
    detach: bool = False,
    max_attempts: int | None = None,
) -> bool:
    """Plan, run (resumably) and summarise an ablation. True when every planned run is done.

    Validates everything (grid, seeds, every variant's recipe, the stored plan, the launcher
    and its cluster) before writing anything. `runner` defaults to `SubprocessRunner()` (tests
    inject a fake). `launcher` 'slurm' or 'ray' hands the runs to a cluster (cluster.py).
    """
    from rich.console import Console

    console = console or Console()
    variant_list = expand_variants(components, grid, variants, compare_released)
    seed_list = parse_seeds(seeds)
    user_overrides = list(overrides)
    check_overrides(user_overrides)
    if baselines is not None:  # each variant on each baseline (grid.cross_baselines)
        variant_list, left_out = cross_baselines(variant_list, baselines, user_overrides)
        for line in left_out:
            console.print(f"[yellow]left out[/yellow] {line}", highlight=False)
    if max_steps is not None:
        if max_steps < 0:
            raise HapoError(f"--max-steps must be >= 0, got {max_steps}")
        user_overrides.append(f"train.max_steps={max_steps}")
    slots = slot_resources(workers, available_cores(), visible_gpus())

    base = load_recipe(recipe, user_overrides, components=BASELINE, seed=0)
    released = [v.name for v in variant_list if RELEASED_OVERRIDE in v.overrides]
    if released and base.algo.entropy_norm == "released":
        raise HapoError(
            f"{', '.join(released)}: the recipe (or --set) already has "
            "algo.entropy_norm=released, so every variant would use it; compare on a recipe "
            "with entropy_norm: paper"
        )
    ablation_dir = Path(output) if output is not None else (
        Path(base.log.output_dir) / f"{base.name}-ablation"
    )
    check_output(ablation_dir)
    cluster = _cluster(launcher, launcher_config, ablation_dir, detach, max_attempts)
    plan = build_plan(variant_list, seed_list)
    planned = AblationSpec(ablation_dir.name, str(recipe), recipe_hash(base), user_overrides, plan)
    # Resolve every run's recipe now: a bad --set fails before anything is written.
    for e in plan:
        run_recipe(recipe, user_overrides, e)
    spec = merge_plan(read_ablation(ablation_dir), planned)

    try:
        ablation_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, a read-only parent
        from ..runlog import os_error_line

        raise HapoError(f"--output: cannot create the ablation directory: "
                        f"{os_error_line(err, ablation_dir)}") from None
    lock_fd = take_lock(ablation_dir)
    try:
        spec = merge_plan(read_ablation(ablation_dir), planned)  # again, under the lock
        # Each run's recipe as it will run, thread count included (the one a started run
        # began with, else the user's --set train.threads, else the worker's fair share; every
        # slot has the same share), from the recipe loader: what is validated is what runs.
        user_threads = user_sets_threads(user_overrides)
        share = (cluster.threads() if cluster else None) or slots[0][0]
        resolved = {
            e.run_dir: run_recipe(recipe, user_overrides, e,
                                  threads_for(ablation_dir / e.run_dir, share, user_threads))
            for e in plan
        }
        if cluster is not None:
            from .cluster import run_cluster

            ok = run_cluster(spec, plan, resolved, ablation_dir, cluster, retry_failed,
                             max_attempts, detach, console, poll_interval,
                             _prepare_shared_policy)
            _report(spec, plan, ablation_dir, console, summary and not detach)
            return ok
        spec.launcher = {"name": "local"}
        return _run_locked(
            spec, plan, resolved, ablation_dir, slots, retry_failed, lock_fd,
            runner or SubprocessRunner(), console, poll_interval, summary,
        )
    finally:
        os.close(lock_fd)


def check_output(ablation_dir: Path) -> None:
    """HapoError unless `--output` can hold an ablation: a new path, or a folder that is not a
    file and not a training run (its manifest.json with no ablation.json beside it)."""
    if ablation_dir.exists() and not ablation_dir.is_dir():
        raise HapoError(f"--output {ablation_dir}: is a file; expected an ablation directory")
    if (ablation_dir / schema.MANIFEST).is_file() and not (ablation_dir / schema.ABLATION).exists():
        raise HapoError(
            f"--output {ablation_dir}: holds a training run ({schema.MANIFEST}), not an "
            "ablation; choose another --output (nothing was changed)"
        )


def _run_locked(
    spec: AblationSpec,
    plan: list[PlanEntry],
    resolved: dict[str, Recipe],
    ablation_dir: Path,
    slots: list[tuple[int, str | None]],
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
        _schedule(spec, todo, resolved, ablation_dir, slots, lock_fd, runner,
                  console, poll_interval)

    ok = all(spec.state(e.run_dir).status == DONE for e in plan)
    _report(spec, plan, ablation_dir, console, summary)
    return ok


def _cluster(name: str, config: Path | dict | None, ablation_dir: Path, detach: bool,
             max_attempts: int | None):
    """The cluster launcher, checked (sbatch, munge, the Ray address) before anything is
    written; None for `local`."""
    from .launchers import load_launcher

    if max_attempts is not None and max_attempts < 1:
        raise HapoError(f"--max-attempts must be >= 1, got {max_attempts}")
    cluster = load_launcher(name, config, ablation_dir)
    if cluster is None and detach:
        raise HapoError("--detach needs a cluster: --launcher slurm or ray (a local ablation "
                        "lives as long as its command)")
    stored = read_ablation(ablation_dir) if ablation_dir.is_dir() else None
    before = (stored.launcher or {}).get("name", "local") if stored else name
    live = [st.job_id for st in (stored.runs.values() if stored else ())
            if st.job_id and st.status in ("queued", "running")]
    if before != name and live:
        raise HapoError(f"{ablation_dir}: runs are queued or running on {before} (jobs "
                        f"{', '.join(live[:3])}); rerun with --launcher {before}")
    if cluster is not None:
        cluster.check()
    return cluster


def _report(spec: AblationSpec, plan: list[PlanEntry], ablation_dir: Path, console: Any,
            summary: bool) -> None:
    """The summary table (if `summary`), then one line per failed or interrupted run."""
    if summary:
        try:
            show_summary(ablation_dir, console=console)
        except (HapoError, ValueError, KeyError) as exc:  # a summary problem must not hide runs
            console.print(f"[yellow]summary not available:[/yellow] {exc}", highlight=False)
    failed = [e.run_dir for e in plan if spec.state(e.run_dir).status == FAILED]
    for name in failed:
        console.print(f"[red]failed[/red] {name}: {spec.state(name).error}", highlight=False)
    for e in plan:
        if spec.state(e.run_dir).status == INTERRUPTED:
            console.print(f"[yellow]interrupted[/yellow] {e.run_dir}: {spec.state(e.run_dir).error}"
                          "; run the same command again to resume it", highlight=False)


def _prepare_shared_policy(recipe: Recipe, console: Any) -> None:
    """Build the shared warm-up policy once, here, before any worker starts (every variant
    and seed of the ablation starts from it: its cache key is model + data only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..models import resolve_policy_path

    with Progress(TextColumn("shared warm-up"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("warm-up", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        path = resolve_policy_path(recipe.model, recipe.data, progress=progress)
    console.print(f"initial policy: {path}", highlight=False)


def _schedule(
    spec: AblationSpec,
    todo: list[PlanEntry],
    resolved: dict[str, Recipe],
    ablation_dir: Path,
    slots: list[tuple[int, str | None]],
    lock_fd: int,
    runner: Runner,
    console: Any,
    poll_interval: float,
) -> None:
    from ..runlog import atomic_write_text

    pending = list(todo)
    active: dict[int, ActiveRun] = {}
    finished: list[str] = []
    display = Display(console, spec, todo, resolved)

    def start(slot: int, entry: PlanEntry) -> None:
        threads, gpu = slots[slot]
        run_dir = ablation_dir / entry.run_dir
        rec = resolved[entry.run_dir]
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
        active[slot] = ActiveRun(entry, handle, slot, MetricsTail(run_dir / schema.METRICS),
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
        elif manifest.get("status") == INTERRUPTED:
            # stopped from outside (SIGTERM, a preemption) while the ablation goes on: the run
            # wrote `interrupted` and exited 130; it is resumable, so a rerun continues it
            st.status = INTERRUPTED
            st.error = manifest.get("message") or exit_error(rc, ablation_dir / (st.log or ""))
        else:
            st.status = FAILED
            st.error = (
                manifest.get("message") if manifest.get("status") == schema.STATUS_FAILED
                else None
            ) or exit_error(rc, ablation_dir / (st.log or ""))
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


