"""`hapo ablate`: HAPO's component ablation grid, resumable, one training process per run.

    expand_variants(components, grid, variants, compare_released) -> [Variant]   grid.py
    build_plan(variants, seeds) -> [PlanEntry]                                    plan.py
    run_ablation(recipe=..., components=..., ...) -> bool (every planned run done) scheduler.py
    show_summary(ablation_dir, console) -> summary DataFrame (also CSV + markdown) summary.py

Modules, each with one job (imports only go down this list, no cycles):
grid (variant names, seeds), plan (plan entries, ablation.json, lock, each run's recipe
through the recipe loader, resume decisions), runner (subprocess, environment, threads,
GPUs, progress of a run), display (live table), summary (the per-variant table), scheduler
(`run_ablation`), launchers (where runs go: this machine, Slurm, Ray), cluster (reconcile,
submit and watch cluster jobs; `hapo ablate status`).

An ablation directory ``results/<name>/`` holds ``ablation.json`` (analysis.schema.ABLATION:
the plan and each run's status and error), one run directory per variant x seed
(``<variant>-s<seed>``), the resolved recipe of each run under ``.plans/`` and its console
output under ``logs/``. Every run is a subprocess ``python -m hapo_cli.cli train --recipe
.plans/<run>.yaml --output <run> --resume``, so a rerun of the same command continues every
interrupted run from its last checkpoint; finished runs are skipped and failed ones are kept
failed unless ``retry_failed``. The directory is locked (fcntl) while the ablation or any of
its training processes lives, so two ablations never write the same run.
"""

from .cluster import show_status
from .grid import (
    BASELINE,
    GRIDS,
    RELEASED_OVERRIDE,
    RELEASED_SUFFIX,
    Variant,
    expand_variants,
    grid_variants,
    parse_letters,
    parse_seeds,
    parse_variants,
)
from .plan import (
    DONE,
    FAILED,
    FORMAT_VERSION,
    INTERRUPTED,
    LOCK_FILE,
    LOGS_DIR,
    PLANNED,
    PLANS_DIR,
    RUNNING,
    AblationSpec,
    PlanEntry,
    RunState,
    build_plan,
    decide,
    latest_checkpoint_step,
    merge_plan,
    read_ablation,
    read_manifest,
    recipe_hash,
    run_recipe,
    write_ablation,
)
from .runner import (
    Job,
    MetricsTail,
    RunHandle,
    Runner,
    SubprocessRunner,
    available_cores,
    child_env,
    last_error_line,
    slot_resources,
    train_command,
    visible_gpus,
)
from .scheduler import run_ablation
from .summary import show_summary

__all__ = [
    "BASELINE", "DONE", "FAILED", "FORMAT_VERSION", "GRIDS", "INTERRUPTED", "LOCK_FILE",
    "LOGS_DIR", "PLANNED", "PLANS_DIR", "RELEASED_OVERRIDE", "RELEASED_SUFFIX", "RUNNING",
    "AblationSpec", "Job", "MetricsTail", "PlanEntry", "RunHandle", "RunState", "Runner",
    "SubprocessRunner", "Variant", "available_cores", "build_plan", "child_env", "decide",
    "expand_variants", "grid_variants", "last_error_line", "latest_checkpoint_step",
    "merge_plan", "parse_letters", "parse_seeds", "parse_variants", "read_ablation",
    "read_manifest", "recipe_hash", "run_ablation", "run_recipe", "show_summary",
    "show_status", "slot_resources", "train_command", "visible_gpus", "write_ablation",
]  # fmt: skip
