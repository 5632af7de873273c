"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracker classes.

`metrics.jsonl` is the record; trackers mirror it on the main process: the recipe once
(flattened to `section.field` with scalar values, which TensorBoard's hparams and MLflow's
params require), then every row under its run-directory name at its step. A resumed run
continues the same tracker run: the wandb run id and the MLflow run id are kept in the
manifest (`trackers`), TensorBoard writes to the same folder. Runs close with their status.

Where the data goes: TensorBoard `<run>/tensorboard/`; wandb `<run>/wandb/` (project `hapo`,
or `WANDB_PROJECT`; `WANDB_MODE=offline` works without network or API key); MLflow to
`MLFLOW_TRACKING_URI` when set (a database such as `sqlite:///path/mlflow.db`, or a server
`http://host:5000`), else to the SQLite store `<run>/mlflow/mlflow.db` (experiment `hapo`, or
`MLFLOW_EXPERIMENT_NAME`): MLflow 3 refuses its file store (`./mlruns`, `file://`) unless
`MLFLOW_ALLOW_FILE_STORE=true`.

`check_trackers` runs before anything starts and turns what would fail later (a package, wandb
credentials, an MLflow URI, a tracker folder that cannot be written) into one line, exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from .errors import HapoError, first_line

if TYPE_CHECKING:
    from accelerate.tracking import MLflowTracker

# tracker -> (module that must import, the extra that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "hapo[tensorboard]"),
    "wandb": ("wandb", "hapo[wandb]"),
    "mlflow": ("mlflow", "hapo[mlflow]"),
}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"  # the default store: <run>/mlflow/mlflow.db, artifacts in <run>/mlflow/artifacts
MLFLOW_DB = "mlflow.db"
# the manifest's `trackers.mlflow_uri` for that store (relative: the run may move)
MLFLOW_OWN = f"{MLFLOW_DIR}/{MLFLOW_DB}"
PROJECT = "hapo"
# wandb modes that need no credentials
_WANDB_LOCAL = ("offline", "dryrun", "disabled")
# MLflow tracking URIs that hapo hands to MLflow unchecked (a database through SQLAlchemy, Databricks)
_MLFLOW_OTHER = ("postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
SERVER_DEADLINE_S = 5.0  # an MLflow server must answer /health within this at start
# MLflow's run status for each run-directory status
_MLFLOW_STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def check_trackers(names: Sequence[str], run_dir: Path | None = None,
                   resume: bool = False) -> None:
    """HapoError (one line, exit 2) for anything about the requested trackers that would fail
    once the run has started: a package not installed and, given the run directory, wandb
    without credentials, an MLflow URI that cannot hold a run, a tracker folder that cannot
    be written. Writes nothing."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise HapoError(
                f"log.trackers: '{name}' needs the {module} package, which is not installed; "
                f"pip install '{extra}' (or 'hapo[trackers]' for all three)"
            )
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    if "tensorboard" in names:
        _check_folder("tensorboard", run_dir / TENSORBOARD_DIR)
    if "wandb" in names:
        _check_folder("wandb", run_dir / WANDB_DIR)
        _check_wandb_credentials()
    if "mlflow" in names:
        uri = mlflow_uri(run_dir)
        _check_mlflow_uri(uri, run_dir)
        if resume:
            _check_mlflow_resume(run_dir)


def _check_folder(name: str, folder: Path) -> None:
    """A tracker folder a resumed run writes into: a folder where a file can be created."""
    if not folder.exists():
        return  # a new run: the run directory's own check covers it
    if not folder.is_dir():
        raise HapoError(f"log.trackers: {folder} is a file; {name} needs a folder there "
                        "(move the file away)")
    try:  # as root, os.access ignores the mode bits: try what the tracker will do
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hapo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise HapoError(f"log.trackers: {name} cannot write its folder {folder}: "
                        f"{err.strerror or type(err).__name__}; make it writable "
                        f"or drop {name} from log.trackers") from None


def _check_wandb_credentials() -> None:
    """Online wandb needs an API key (WANDB_API_KEY, `wandb login`'s netrc or settings);
    without one, wandb.init fails ('No API key configured') only after the model has loaded."""
    try:  # wandb's own lookup (0.2x-0.3x); another wandb reports its error itself at start
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate
    except ImportError:
        return
    settings = wandb_setup.singleton().settings
    if str(settings.mode) in _WANDB_LOCAL:
        return
    try:
        auth = authenticate.authenticate_session(
            host=settings.base_url, source="hapo", prompt=False, update_session=False)
    except AuthenticationError as err:
        raise HapoError(f"log.trackers: wandb: {first_line(err)}") from None
    if auth is None:
        raise HapoError(
            f"log.trackers: wandb has no API key for {settings.base_url}; set WANDB_API_KEY, "
            "run `wandb login`, or set WANDB_MODE=offline to log to <run>/wandb without one"
        )


def mlflow_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the run's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path(run_dir) / MLFLOW_DIR / MLFLOW_DB).resolve()}"


def _mlflow_fix(run_dir: Path) -> str:
    return ("use a database (sqlite:///path/mlflow.db) or a server (http://host:5000), or unset "
            f"MLFLOW_TRACKING_URI to log to {Path(run_dir) / MLFLOW_DIR / MLFLOW_DB}")


def _check_mlflow_uri(uri: str, run_dir: Path) -> None:
    """The URI names a store MLflow can open: a SQLite file (or where one can be made), a
    server that answers, or a database MLflow reaches through SQLAlchemy."""
    where = (f"log.trackers: mlflow: MLFLOW_TRACKING_URI={uri}"
             if os.environ.get("MLFLOW_TRACKING_URI") else f"log.trackers: mlflow: {uri}")
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive letter)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise HapoError(f"{where}: MLflow 3 refuses its file store (maintenance mode); "
                            + _mlflow_fix(run_dir))
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        if path.exists() and not path.is_dir():
            raise HapoError(f"{where}: {path} is a file; the file store is a folder")
        return
    if scheme == "sqlite" or scheme in _MLFLOW_OTHER[:3]:
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise HapoError(f"{where}: a database store needs {' and '.join(missing)}; "
                            "pip install 'hapo[mlflow]'")
    if scheme == "sqlite":
        _check_sqlite(uri, where, run_dir)
    elif scheme in ("http", "https"):
        _check_server(uri, where)
    elif scheme not in _MLFLOW_OTHER:
        raise HapoError(f"{where}: unknown scheme '{scheme}'; " + _mlflow_fix(run_dir))


def _check_sqlite(uri: str, where: str, run_dir: Path) -> None:
    if not uri.startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
        raise HapoError(f"{where}: names no database file (sqlite:///relative.db or "
                        "sqlite:////absolute/path.db)")
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    if db == (Path(run_dir) / MLFLOW_DIR / MLFLOW_DB).resolve():  # the default, made at start
        _check_folder("mlflow", db.parent)
        if not db.parent.is_dir():
            return
    elif not db.parent.is_dir():
        raise HapoError(f"{where}: folder {db.parent} does not exist; create it or name "
                        "another database file")
    if db.is_dir():
        raise HapoError(f"{where}: {db} is a folder; expected an SQLite database file")
    if db.exists():
        try:
            with open(db, "r+b") as f:  # readable and writable, without changing it
                head = f.read(16)
        except OSError as err:
            raise HapoError(f"{where}: cannot write {db}: {err.strerror}") from None
        if head and head != b"SQLite format 3\x00":
            raise HapoError(f"{where}: {db} is not an SQLite database (and is never "
                            "replaced); name a new .db file")
    try:  # SQLite writes its journal beside the database
        fd, probe = tempfile.mkstemp(dir=db.parent, prefix=".hapo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise HapoError(f"{where}: cannot write in {db.parent}: {err.strerror}") from None


def _check_server(uri: str, where: str) -> None:
    """An MLflow server answers its /health route within SERVER_DEADLINE_S (MLflow's own
    client would retry for minutes, after the model has loaded)."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=SERVER_DEADLINE_S):
            return
    except urllib.error.HTTPError:
        return  # something answered: MLflow reports its own errors (auth) at start
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise HapoError(f"{where}: no server answered {url} within {SERVER_DEADLINE_S:g} s "
                        f"({first_line(reason) if isinstance(reason, BaseException) else reason}); "
                        "start it (mlflow server) or unset MLFLOW_TRACKING_URI") from None


def _check_mlflow_resume(run_dir: Path) -> None:
    """--resume continues the MLflow run in the store it was started in."""
    from analysis import schema

    try:
        manifest = json.loads((Path(run_dir) / schema.MANIFEST).read_text(encoding="utf-8"))
        before = (manifest.get("trackers") or {}).get("mlflow_uri")
    except (OSError, ValueError, AttributeError):
        return
    now = os.environ.get("MLFLOW_TRACKING_URI") or MLFLOW_OWN
    if before is None or before == now:
        return
    if before == MLFLOW_OWN:
        raise HapoError(
            f"log.trackers: mlflow: --resume: this run logged to its own store "
            f"{Path(run_dir) / MLFLOW_OWN}, not MLFLOW_TRACKING_URI={now}; unset "
            "MLFLOW_TRACKING_URI to continue it"
        )
    raise HapoError(
        f"log.trackers: mlflow: --resume: this run logged to MLflow at {before}, not "
        f"{mlflow_uri(run_dir)}; set MLFLOW_TRACKING_URI={before} to continue it"
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
        self.ids: dict[str, str] = {}  # tracker -> its run id (and mlflow_uri: where)
        self.mlflow_uri = ""

    def start(self, config: dict[str, Any], previous_ids: dict[str, str] | None = None) -> None:
        """Start every tracker (continuing `previous_ids` runs) and log the flattened recipe."""
        previous_ids = previous_ids or {}
        flat = flat_config(config)
        for name in self.names:
            try:
                tracker = self._tracker(name, previous_ids)
                tracker.start()
            except Exception as exc:  # noqa: BLE001 - past check_trackers: still one line
                raise HapoError(f"log.trackers: {name} did not start ({self._where(name)}): "
                                f"{first_line(exc)}") from None
            if name == "mlflow":
                self.ids["mlflow"] = cast("MLflowTracker", tracker).active_run.info.run_id
            if name not in previous_ids or self.ids[name] != previous_ids[name]:
                # params are logged once per tracker run (TensorBoard: once per start)
                tracker.store_init_configuration(flat)
            self.trackers.append(tracker)

    def _dir(self) -> Path:
        """The run directory: every tracker writes under it (main process: always given)."""
        assert self.run_dir is not None, "trackers need a run directory"
        return self.run_dir

    def _tracker(self, name: str, previous_ids: dict[str, str]):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        run_dir = self._dir()
        if name == "tensorboard":
            return TensorBoardTracker(TENSORBOARD_DIR, str(run_dir))
        if name == "wandb":
            import uuid

            run_id = previous_ids.get("wandb") or uuid.uuid4().hex[:12]
            (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
            self.ids["wandb"] = run_id
            return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), id=run_id,
                                resume="allow", name=run_dir.name, dir=str(run_dir))
        return self._mlflow(previous_ids)

    def _where(self, name: str) -> str:
        if name == "mlflow":
            return self.mlflow_uri
        return str(self._dir() / (TENSORBOARD_DIR if name == "tensorboard" else WANDB_DIR))

    def _mlflow(self, previous_ids: dict[str, str]):
        """accelerate's MLflowTracker on this run's store; a resumed run whose MLflow run is
        not in the store (its database deleted) starts a new MLflow run, and says so."""
        import mlflow
        from accelerate.tracking import MLflowTracker
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_dir = self._dir()
        self.mlflow_uri = mlflow_uri(run_dir)
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.ids["mlflow_uri"] = user_uri or MLFLOW_OWN
        logging_dir = None
        if not user_uri:  # the run's own store
            store = run_dir / MLFLOW_DIR
            store.mkdir(parents=True, exist_ok=True)
            logging_dir = (store / "artifacts").resolve().as_uri()
        mlflow.set_tracking_uri(self.mlflow_uri)  # process-global; beats the variable
        if not user_uri:  # set_tracking_uri exports it: a later run here would take it for the user's
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        # "Creating initial MLflow database tables..." on stderr at each new store
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        run_id = previous_ids.get("mlflow")
        if run_id is not None:
            try:
                MlflowClient().get_run(run_id)
            except MlflowException:
                from rich.console import Console

                Console(stderr=True).print(
                    f"[yellow]warning:[/yellow] MLflow run {run_id} is not in "
                    f"{self.mlflow_uri}; logging to a new MLflow run", highlight=False)
                run_id = None
        return MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                           logging_dir=logging_dir, run_id=run_id, run_name=run_dir.name)

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
