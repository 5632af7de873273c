"""Reliability of the experiment trackers (issue 30, items 9, 10, 13): what would fail once the
run has started (an MLflow URI MLflow 3 refuses or cannot open, wandb without an API key, a
tracker folder that cannot be written before --resume) is one line at start, exit 2, nothing
else printed and nothing on disk changed; a tracker listed twice is a recipe error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import sets
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

runner = CliRunner()


def train_args(out: Path, cache_dir: Path, trackers: str, steps: int = 1, *extra: str):
    return ["train", "--recipe", "tiny/hapo", "--max-steps", str(steps), "--output", str(out),
            *sets(cache_dir, f"log.trackers=[{trackers}]", "log.token_sample_every=0",
                  "log.checkpoint_every=1", *extra)]


def only_line(output: str) -> str:
    """The whole output is one line, `error: ...` (no traceback, no warning, no progress)."""
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".hapo.lock"}


def _offline(mp: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Trackers that need no network and no account: wandb offline, MLflow's own store."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    return mp


@pytest.fixture
def env(monkeypatch):
    return _offline(monkeypatch)


ALL = "tensorboard,wandb,mlflow"


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, cache_dir) -> Path:
    """A finished 1-step run that logged to all three trackers."""
    run = tmp_path_factory.mktemp("done") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        res = runner.invoke(app, train_args(run, cache_dir, ALL, 1))
    assert res.exit_code == 0, res.output
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".hapo.lock"))
    return dst


# ---------------------------------------------------------------------------------------------
# item 9: MLflow 3
# ---------------------------------------------------------------------------------------------


def test_mlflow_default_store_is_the_runs_sqlite_and_holds_its_metrics(env, tmp_path, cache_dir):
    """No MLFLOW_TRACKING_URI (mlflow-skinny 3.18 refused ./mlruns): <run>/mlflow/mlflow.db."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    res = runner.invoke(app, train_args(run, cache_dir, "mlflow", 2))
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "INFO" not in res.output
    db = run / "mlflow" / "mlflow.db"
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    assert not (Path.cwd() / "mlruns").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow.set_tracking_uri exports it
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = json.loads((run / schema.MANIFEST).read_text())["trackers"]["mlflow"]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    rows = [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines()]
    want = {r["step"]: r["reward/acc"] for r in rows if "reward/acc" in r}
    history = client.get_metric_history(run_id, "reward/acc")
    assert {m.step: m.value for m in history} == want and sorted(want) == [1, 2]


@contextmanager
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound, not listening: a connection is refused at once


def _bad_uri(kind: str, tmp_path: Path, port: int) -> tuple[str, str]:
    """(MLFLOW_TRACKING_URI, what the line says) for each kind of bad URI."""
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    folder = tmp_path / "mlruns"
    folder.mkdir()
    return {
        "file-folder": (folder.as_uri(), "refuses its file store"),
        "file-uri-of-a-file": (text.as_uri(), "refuses its file store"),
        "plain-path": (str(folder), "refuses its file store"),
        "sqlite-text-file": (f"sqlite:///{text}", "is not an SQLite database"),
        "sqlite-folder": (f"sqlite:///{folder}", "is a folder"),
        "sqlite-no-folder": (f"sqlite:///{tmp_path}/nowhere/m.db", "does not exist"),
        "sqlite-memory": ("sqlite://", "names no database file"),
        "server-down": (f"http://127.0.0.1:{port}", "no server answered"),
        "unknown-scheme": ("mlfow://host", "unknown scheme 'mlfow'"),
    }[kind]


@pytest.mark.parametrize("kind", ["file-folder", "file-uri-of-a-file", "plain-path",
                                  "sqlite-text-file", "sqlite-folder", "sqlite-no-folder",
                                  "sqlite-memory", "server-down", "unknown-scheme"])
def test_bad_mlflow_uri_is_one_line_before_anything(kind, env, tmp_path, cache_dir):
    with closed_port() as port:
        uri, says = _bad_uri(kind, tmp_path, port)
        env.setenv("MLFLOW_TRACKING_URI", uri)
        before = snapshot(tmp_path)
        run = tmp_path / "run"
        res = runner.invoke(app, train_args(run, cache_dir, "mlflow"))
    assert res.exit_code == 2, res.output
    line = only_line(res.output)
    assert line.startswith(f"error: log.trackers: mlflow: MLFLOW_TRACKING_URI={uri}: "), line
    assert says in line, line
    assert not run.exists() and snapshot(tmp_path) == before  # the notes file untouched


def test_resume_with_another_mlflow_store_is_one_line(env, tmp_path, cache_dir, done_run):
    run = copy_run(done_run, tmp_path / "run")
    before = snapshot(run)
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    res = runner.invoke(app, [*train_args(run, cache_dir, ALL, 2), "--resume"])
    assert res.exit_code == 2, res.output
    line = only_line(res.output)
    assert f"its own store {run / 'mlflow' / 'mlflow.db'}" in line
    assert "unset MLFLOW_TRACKING_URI" in line
    assert snapshot(run) == before and not (tmp_path / "other.db").exists()


# ---------------------------------------------------------------------------------------------
# item 10: wandb online without an API key
# ---------------------------------------------------------------------------------------------


def test_wandb_online_without_api_key_is_one_line(tmp_path, cache_dir):
    """A fresh process (wandb keeps its settings per process) with a HOME and config folder
    holding no key, no WANDB_MODE."""
    home = tmp_path / "home"
    home.mkdir()
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("WANDB_", "NETRC", "MLFLOW_"))}
    environ = {**keep, "HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb"),
               "NETRC": str(home / ".netrc")}
    run = tmp_path / "run"
    hapo = Path(sys.executable).with_name("hapo")
    res = subprocess.run([str(hapo), *train_args(run, cache_dir, "wandb")], env=environ,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""
    line = only_line(res.stderr)
    assert line.startswith("error: log.trackers: wandb has no API key for "), line
    for fix in ("WANDB_API_KEY", "wandb login", "WANDB_MODE=offline"):
        assert fix in line, line
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# item 13: a tracker folder that cannot be written, before --resume
# ---------------------------------------------------------------------------------------------

@contextmanager
def read_only(folder: Path):
    """No file can be created in `folder`: chmod for a user, `chattr +i` for root (root
    ignores the mode bits)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    res = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"root and no chattr +i here: {res.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("tracker, folder", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("mlflow", "mlflow")])
def test_read_only_tracker_folder_before_resume_is_one_line(tracker, folder, env, tmp_path,
                                                            cache_dir, done_run):
    run = copy_run(done_run, tmp_path / "run")
    before = snapshot(run)
    with read_only(run / folder):
        res = runner.invoke(app, [*train_args(run, cache_dir, ALL, 2), "--resume"])
    assert res.exit_code == 2, res.output
    line = only_line(res.output)
    assert line.startswith(f"error: log.trackers: {tracker}"), line
    assert str(run / folder) in line and "make it writable" in line, line
    assert snapshot(run) == before
    assert json.loads((run / schema.MANIFEST).read_text())["status"] == "done"


# ---------------------------------------------------------------------------------------------
# smaller: a tracker listed twice
# ---------------------------------------------------------------------------------------------


def test_tracker_listed_twice_is_a_recipe_error(tmp_path, cache_dir):
    run = tmp_path / "run"
    res = runner.invoke(app, train_args(run, cache_dir, "tensorboard,wandb,tensorboard"))
    assert res.exit_code == 2, res.output
    line = only_line(res.output)
    assert "log.trackers=['tensorboard', 'wandb', 'tensorboard']" in line
    assert "tensorboard listed more than once" in line and "[tensorboard, wandb]" in line
    assert not run.exists()
