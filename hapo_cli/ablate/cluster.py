"""An ablation on a cluster (`--launcher slurm|ray`): reconcile the recorded jobs with the
cluster, submit what has to run (never a second job for a run whose job is queued or running),
then, unless `--detach`, watch the jobs and resubmit a preempted run until it is done or has
used `--max-attempts` starts. The runs' state lives in the ablation folder (shared filesystem):
ablation.json records the launcher, each run's job id and attempts; each run directory's
manifest says done, failed or interrupted once its job is gone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from analysis import schema

from ..recipe import Recipe
from ..runlog import atomic_write_text
from .launchers import GONE, RUNNING, Launcher, Submission
from .plan import (
    DONE,
    FAILED,
    INTERRUPTED,
    LOGS_DIR,
    PLANNED,
    PLANS_DIR,
    QUEUED,
    AblationSpec,
    PlanEntry,
    RunState,
    decide,
    read_manifest,
    write_ablation,
)
from .runner import Job, MetricsTail, child_env, last_error_line, train_command

DEFAULT_MAX_ATTEMPTS = 3
LIVE = (QUEUED, RUNNING)


def settle(st: RunState, manifest: dict[str, Any], log: Path) -> None:
    """The run's job is gone: record what its manifest says (a job that left no result, e.g.
    cancelled before it started or killed with its node, is resumable: interrupted)."""
    st.attempts, st.restarts = st.attempt, 0  # the cluster's requeues now count as starts
    st.ended = time.time()
    status = manifest.get("status")
    st.step = manifest.get("final_step", st.step)
    if status == schema.STATUS_DONE:
        st.status, st.error = DONE, None
    elif status == schema.STATUS_FAILED:
        st.status, st.error = FAILED, manifest.get("message") or "failed"
    else:
        st.status = INTERRUPTED
        st.error = manifest.get("message") if status == INTERRUPTED else (
            f"job {st.job_id} ended without a result (last output: "
            f"{last_error_line(log) or 'none'})")


def run_cluster(
    spec: AblationSpec,
    plan: list[PlanEntry],
    resolved: dict[str, Recipe],
    ablation_dir: Path,
    launcher: Launcher,
    retry_failed: bool,
    max_attempts: int | None,
    detach: bool,
    console: Any,
    poll_interval: float,
    prepare: Any,
) -> bool:
    """Reconcile, submit, and (unless `detach`) watch until every run is done or failed.
    True when every planned run is done (`detach`: when nothing failed)."""
    max_attempts = max_attempts or DEFAULT_MAX_ATTEMPTS
    spec.launcher = launcher.record()
    states = (launcher.states([j for e in plan if (j := spec.state(e.run_dir).job_id)])
              if any(spec.state(e.run_dir).job_id for e in plan) else {})
    todo: list[PlanEntry] = []
    for e in plan:
        st = spec.state(e.run_dir)
        live, restarts = states.get(st.job_id or "", (GONE, 0))
        if live != GONE:  # its job is queued or running: watch it, never submit another
            st.status, st.restarts = live, restarts
            continue
        if st.status in LIVE:
            settle(st, read_manifest(ablation_dir / e.run_dir), ablation_dir / (st.log or ""))
        if retry_failed and st.status == FAILED:
            st.attempts = st.restarts = 0
        manifest = read_manifest(ablation_dir / e.run_dir)
        action = decide(manifest, st, resolved[e.run_dir].train.max_steps, retry_failed,
                        max_attempts)
        if action == DONE:
            st.status, st.error = DONE, None
        elif action == FAILED:
            gave_up = st.status != FAILED and manifest.get("status") != schema.STATUS_FAILED
            st.status = FAILED
            if gave_up:
                st.error = f"gave up after {st.attempt} attempts (last: {st.error})"
            st.error = st.error or manifest.get("message") or "failed"
        else:
            todo.append(e)
            st.status = INTERRUPTED if st.status in (*LIVE, INTERRUPTED) else PLANNED
    write_ablation(ablation_dir, spec)
    counts = {s: sum(spec.state(e.run_dir).status == s for e in plan)
              for s in (DONE, FAILED, QUEUED, RUNNING)}
    console.print(
        f"ablation [bold]{spec.name}[/bold] ({ablation_dir}) on {launcher.name}: {len(plan)} "
        f"runs, {counts[DONE]} done, {counts[FAILED]} failed, "
        f"{counts[QUEUED] + counts[RUNNING]} queued or running, {len(todo)} to submit",
        highlight=False)
    if todo:
        prepare(resolved[todo[0].run_dir], console)  # the shared warm-up policy, once, here
        _submit(spec, todo, resolved, ablation_dir, launcher, console, max_attempts)
    if detach:
        console.print(f"detached: `hapo ablate status {ablation_dir}` shows the runs; the same "
                      "command again resubmits any that were interrupted", highlight=False)
        return all(spec.state(e.run_dir).status != FAILED for e in plan)
    try:
        _watch(spec, plan, resolved, ablation_dir, launcher, max_attempts, console,
               poll_interval)
    except KeyboardInterrupt:
        write_ablation(ablation_dir, spec)
        console.print("stopped watching; the jobs go on on the cluster: `hapo ablate status "
                      f"{ablation_dir}`", highlight=False)
        raise
    return all(spec.state(e.run_dir).status == DONE for e in plan)


def _submit(spec, todo, resolved, ablation_dir, launcher, console, max_attempts) -> None:
    subs = []
    for e in todo:
        st = spec.state(e.run_dir)
        recipe_path = ablation_dir / PLANS_DIR / f"{e.run_dir}.yaml"
        atomic_write_text(recipe_path, resolved[e.run_dir].to_yaml())
        log_path = ablation_dir / LOGS_DIR / f"{e.run_dir}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        rec = resolved[e.run_dir]
        job = Job(name=e.run_dir, variant=e.variant, seed=e.seed,
                  run_dir=(ablation_dir / e.run_dir).resolve(), recipe_path=recipe_path.resolve(),
                  log_path=log_path.resolve(), env=child_env(rec.train.threads or 1, None))
        env = {k: v for k, v in job.env.items() if k != "CUDA_VISIBLE_DEVICES"}
        subs.append(Submission(e.run_dir, train_command(job), env, job.log_path,
                               st.attempt + 1, max(1, max_attempts - st.attempt)))
        st.log = str(log_path.relative_to(ablation_dir))
    t0 = time.perf_counter()
    ids = launcher.submit(subs)
    for e, job_id in zip(todo, ids):
        st = spec.state(e.run_dir)
        st.job_id, st.status, st.attempts, st.restarts = job_id, QUEUED, st.attempt + 1, 0
        st.started, st.ended, st.rc, st.error = time.time(), None, None, None
    write_ablation(ablation_dir, spec)
    console.print(f"submitted {len(ids)} run(s) to {launcher.name} in "
                  f"{time.perf_counter() - t0:.1f} s: "
                  + ", ".join(f"{e.run_dir}={j}" for e, j in zip(todo, ids)), highlight=False)


def _watch(spec, plan, resolved, ablation_dir, launcher, max_attempts, console,
           poll_interval) -> None:
    while True:
        live = [e for e in plan if spec.state(e.run_dir).status in LIVE]
        if not live:
            return
        time.sleep(poll_interval)
        states = launcher.states([spec.state(e.run_dir).job_id for e in live])
        again = []
        for e in live:
            st = spec.state(e.run_dir)
            state, restarts = states[st.job_id]
            if state != GONE:
                if (state, restarts) != (st.status, st.restarts):
                    console.print(f"{e.run_dir}: {state} (job {st.job_id}, attempt "
                                  f"{st.attempts + restarts})", highlight=False)
                st.status, st.restarts = state, restarts
                continue
            settle(st, read_manifest(ablation_dir / e.run_dir), ablation_dir / (st.log or ""))
            if st.status == INTERRUPTED and st.attempt < max_attempts:
                again.append(e)
            elif st.status == INTERRUPTED:
                st.status = FAILED
                st.error = f"gave up after {st.attempt} attempts (last: {st.error})"
            colour = {DONE: "green", FAILED: "red"}.get(st.status, "yellow")
            console.print(f"[{colour}]{st.status}[/{colour}] {e.run_dir} (job {st.job_id}, "
                          f"attempt {st.attempt}){': ' + st.error if st.error else ''}",
                          highlight=False)
        write_ablation(ablation_dir, spec)
        if again:
            _submit(spec, again, resolved, ablation_dir, launcher, console, max_attempts)


def live_states(spec: AblationSpec, ablation_dir: Path) -> tuple[dict[str, RunState], str]:
    """Each run's state now (`hapo ablate status`): the cluster's for a run whose job is
    queued or running, else what its manifest says; and a note when the cluster did not
    answer (the recorded states are shown)."""
    from .launchers import LauncherError, load_launcher

    note = ""
    rec = dict(spec.launcher or {})
    name = rec.pop("name", "local")
    ids = [st.job_id for e in spec.plan if (st := spec.state(e.run_dir)).job_id
           and st.status in LIVE]
    states: dict[str, tuple[str, int]] = {}
    if name != "local" and ids:
        try:
            launcher = load_launcher(name, {name: rec}, ablation_dir)
            states = launcher.states(ids) if launcher else {}
        except LauncherError as exc:
            note = f"{name} did not answer ({exc}); showing the recorded states"
    out = {}
    for e in spec.plan:
        st = spec.state(e.run_dir)
        st = RunState(**{k: getattr(st, k) for k in RunState.__dataclass_fields__})
        manifest = read_manifest(ablation_dir / e.run_dir)
        if st.job_id in states:
            state, restarts = states[st.job_id]
            if state == GONE:
                settle(st, manifest, ablation_dir / (st.log or ""))
            else:
                st.status, st.restarts = state, restarts
        elif name == "local" and manifest.get("status") in (DONE, FAILED, INTERRUPTED):
            st.status = manifest["status"]
        tail = MetricsTail(ablation_dir / e.run_dir / schema.METRICS)
        tail.update()
        st.step = tail.step if tail.step is not None else st.step
        out[e.run_dir] = st
    return out, note


def show_status(ablation_dir: Path, console: Any) -> dict[str, RunState]:
    """`hapo ablate status DIR`: every run's live state, attempt, job id and step."""
    from rich.table import Table

    from ..errors import HapoError
    from .plan import read_ablation

    spec = read_ablation(Path(ablation_dir))
    if spec is None:
        raise HapoError(f"{ablation_dir}: no {schema.ABLATION} here (not an ablation directory)")
    states, note = live_states(spec, Path(ablation_dir))
    name = (spec.launcher or {}).get("name", "local")
    table = Table("run", "status", "attempt", "job", "step", "note",
                  title=f"{spec.name} on {name}")
    colour = {DONE: "green", FAILED: "red", INTERRUPTED: "yellow", RUNNING: "cyan"}
    for run, st in states.items():
        c = colour.get(st.status, "white")
        table.add_row(run, f"[{c}]{st.status}[/{c}]", str(st.attempt), st.job_id or "",
                      "" if st.step is None else str(st.step),
                      (st.error or "")[:80] if st.status in (FAILED, INTERRUPTED) else "")
    console.print(table)
    if note:
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    return states
