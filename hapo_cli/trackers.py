"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracker classes.

`metrics.jsonl` is the record; trackers mirror it on the main process: the recipe once
(flattened to `section.field` with scalar values, which TensorBoard's hparams and MLflow's
params require), then every row under its run-directory name at its step. A resumed run
continues the same tracker run: the wandb run id and the MLflow run id are kept in the
manifest (`trackers`), TensorBoard writes to the same folder. Runs close with their status.

Where the data goes: TensorBoard `<run>/tensorboard/`; wandb `<run>/wandb/` (project `hapo`,
or `WANDB_PROJECT`; `WANDB_MODE=offline` works without network); MLflow wherever
`MLFLOW_TRACKING_URI` points (experiment `hapo`, or `MLFLOW_EXPERIMENT_NAME`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import HapoError, first_line

# tracker -> (module that must import, the extra that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "hapo[tensorboard]"),
    "wandb": ("wandb", "hapo[wandb]"),
    "mlflow": ("mlflow", "hapo[mlflow]"),
}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
PROJECT = "hapo"
# MLflow's run status for each run-directory status
_MLFLOW_STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """HapoError (exit 2, before anything starts) for a requested tracker that is not installed."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise HapoError(
                f"log.trackers: '{name}' needs the {module} package, which is not installed; "
                f"pip install '{extra}' (or 'hapo[trackers]' for all three)"
            )


def flat_config(tree: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{'train.lr': 1e-06, 'train.betas': '[0.9, 0.999]', 'model.path': 'None', ...}:
    scalars kept with their type, lists as JSON text, None as 'None'."""
    out: dict[str, bool | int | float | str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if tree is None:
        out[key] = "None"
    elif isinstance(tree, (bool, int, float, str)):
        out[key] = tree
    else:
        out[key] = json.dumps(tree)
    return out


def scalar_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (no step, strings, None, NaN or bools)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def mlflow_name(key: str) -> str:
    """MLflow allows only [A-Za-z0-9_-. :/] in metric names: `val/arith/avg@4` is logged as
    `val/arith/avg_at_4`; every other run-directory name is already valid."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


class Trackers:
    """The recipe's trackers for one run (main process only; elsewhere every call is a no-op)."""

    def __init__(self, names: list[str], run_dir: Path | None, enabled: bool = True):
        self.names = list(names) if enabled else []
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.trackers: list[Any] = []
        self.ids: dict[str, str] = {}

    def start(self, config: dict[str, Any], previous_ids: dict[str, str] | None = None) -> None:
        """Start every tracker (continuing `previous_ids` runs) and log the flattened recipe."""
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        previous_ids = previous_ids or {}
        flat = flat_config(config)
        for name in self.names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(TENSORBOARD_DIR, str(self.run_dir))
            elif name == "wandb":
                import uuid

                run_id = previous_ids.get("wandb") or uuid.uuid4().hex[:12]
                (self.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
                tracker = WandBTracker(
                    os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, resume="allow",
                    name=self.run_dir.name, dir=str(self.run_dir),
                )
                self.ids["wandb"] = run_id
            else:
                tracker = MLflowTracker(
                    experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                    run_id=previous_ids.get("mlflow"), run_name=self.run_dir.name,
                )
            tracker.start()
            if name == "mlflow":
                self.ids["mlflow"] = tracker.active_run.info.run_id
            if name not in previous_ids:  # params are logged once per tracker run
                tracker.store_init_configuration(flat)
            self.trackers.append(tracker)

    def log(self, row: dict[str, Any]) -> None:
        """Log a metrics row at its step. A tracker that fails (a server gone away) is warned
        about once and dropped: metrics.jsonl has every row, the run goes on."""
        values = scalar_metrics(row)
        if not values:
            return
        for tracker in list(self.trackers):
            named = {mlflow_name(k): v for k, v in values.items()} if tracker.name == "mlflow" \
                else values
            try:
                tracker.log(named, step=int(row["step"]))
            except Exception as exc:  # noqa: BLE001 - any tracker error; metrics.jsonl is the record
                from rich.console import Console

                Console(stderr=True).print(
                    f"[yellow]warning:[/yellow] tracker {tracker.name} failed at step "
                    f"{row['step']} and is no longer logged to: {first_line(exc)}",
                    highlight=False)
                self.trackers.remove(tracker)

    def close(self, status: str) -> None:
        """Flush and end every tracker run with the run's status; never raises."""
        for tracker in self.trackers:
            try:
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status=_MLFLOW_STATUS.get(status, "FAILED"))
                elif tracker.name == "wandb":
                    tracker.run.finish(exit_code=0 if status == "done" else 1)
                else:
                    tracker.writer.close()
            except Exception:  # noqa: BLE001 - a tracker's own failure must not hide the run's
                pass
        self.trackers = []
