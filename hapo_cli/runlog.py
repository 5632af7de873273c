"""The run directory (docs/run-directory.md): writer side. Analysis reads the same layout via analysis.schema.

results/<run>/recipe.yaml, manifest.json, metrics.jsonl, tokens/step-NNNNNN.parquet, eval/*.jsonl,
checkpoints/step-NNNNNN/. Every whole-file write goes to a temporary file and is renamed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from analysis import schema

from .errors import RunDirError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("hapo", "torch", "transformers", "accelerate", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# What a run writes into its directory: the only names `--overwrite` removes. Anything else
# there (the user's notes, sources, tracker folders) is left alone.
RUN_FILES = (schema.RECIPE, schema.MANIFEST, schema.METRICS)
RUN_DIRS = (schema.TOKENS_DIR, schema.EVAL_DIR, schema.CHECKPOINTS_DIR, "analysis",
            "tensorboard", "wandb", "mlflow")  # the last three: hapo_cli.trackers
LOCK_FILE = ".hapo.lock"


def os_error_line(err: OSError, path: Path | str | None = None) -> str:
    """One line for an OSError: the path and the reason ("No space left on device")."""
    where = err.filename or path or "?"
    reason = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    return f"{where}: {reason}"


def disk_full(err: BaseException, path: Path) -> bool:
    """ENOSPC, or an error from a writer that hides it (torch.save's zip writer raises
    RuntimeError "unexpected pos ...") while `path`'s filesystem has no room left."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(err, RuntimeError):
        return False
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False


class RunLog:
    """Writer for one run directory. Only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.manifest: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # ---- lifecycle ----
    @staticmethod
    def holds_run(run_dir: Path) -> bool:
        """A directory holds a run when it has a manifest (written first by every run)."""
        return (run_dir / schema.MANIFEST).is_file()

    @staticmethod
    def prepare(run_dir: Path, recipe_yaml: str, resume: bool, overwrite: bool) -> str:
        """Check what the directory holds; returns 'new', 'resume' or 'overwrite'.

        Raises RunDirError (nothing touched) when the directory holds a run and neither flag allows
        it, when --resume meets a different recipe, or when a directory that is not a run holds
        files a run would write (they are never replaced, whatever the flags).
        """
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: is a file; expected a run directory for --output")
        if not run_dir.exists() or not RunLog.holds_run(run_dir):
            entries = [c for c in run_dir.iterdir() if c.name != LOCK_FILE] if run_dir.exists() else []
            clash = [n for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists()]
            if clash:
                raise RunDirError(
                    f"{run_dir}: holds '{clash[0]}' but no {schema.MANIFEST}, so it is not a hapo "
                    "run and nothing in it is replaced; choose another --output"
                )
            if entries and not overwrite and not resume:
                raise RunDirError(
                    f"{run_dir}: directory is not empty and holds no hapo run; "
                    "choose another --output or pass --overwrite (its files are kept)"
                )
            return "new"
        if resume:
            stored = run_dir / schema.RECIPE
            if stored.exists():
                diff = _recipe_diff(stored.read_text(), recipe_yaml)
                if diff:
                    raise RunDirError(
                        f"{run_dir}: --resume with a different recipe ({diff}); "
                        "use the same recipe or a new --output"
                    )
            return "resume"
        if overwrite:
            return "overwrite"
        raise RunDirError(
            f"{run_dir}: already holds a run; pass --resume to continue it or --overwrite to replace it"
        )

    def lock(self) -> None:
        """Take the directory's write lock (flock, released when the process ends), or raise
        RunDirError naming the process that holds it. Two `hapo train` into one folder would
        otherwise interleave their rows."""
        if not self.enabled or self._lock_fd is not None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot write the run directory: {os_error_line(err, self.dir)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.dir}: another hapo process (pid {holder}) is writing this run; "
                "wait for it to finish or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the write lock (the process ending releases it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self, recipe_yaml: str, info: dict[str, Any], mode: str) -> None:
        """Lock the directory, re-check it under the lock, clear what an overwritten run wrote,
        and write the recipe and a `running` manifest. Call only once everything that can be
        validated has been: before this, nothing on disk has changed."""
        if not self.enabled:
            return
        self.lock()
        if mode == "new" and self.holds_run(self.dir):
            raise RunDirError(
                f"{self.dir}: another process started a run here meanwhile; "
                "pass --resume or --overwrite, or choose another --output"
            )
        try:
            if mode == "overwrite":
                # the manifest goes last (replaced atomically below), so a kill half-way still
                # leaves a directory that counts as a run and can be overwritten again
                for name in RUN_DIRS:
                    if (self.dir / name).is_dir():
                        shutil.rmtree(self.dir / name)
                for name in (schema.METRICS, schema.RECIPE):
                    (self.dir / name).unlink(missing_ok=True)
            atomic_write_text(self.dir / schema.RECIPE, recipe_yaml)
        except OSError as err:
            raise RunDirError(f"cannot write the run directory: {os_error_line(err, self.dir)}") from None
        prev = self._read_manifest() if mode == "resume" else {}
        self.manifest = {
            **prev,
            **info,
            "status": "running",
            "git_rev": git_revision(),
            "versions": _versions(),
            "start_time": prev.get("start_time", time.time()),
            "resumed_at": [*prev.get("resumed_at", []), time.time()] if mode == "resume" else [],
            "end_time": None,
        }
        self._write_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        return schema.read_manifest(self.dir)

    def _write_manifest(self) -> None:
        atomic_write_text(
            self.dir / schema.MANIFEST, json.dumps(self.manifest, indent=2, default=_json_default)
        )

    def finish(self, status: str, **extra: Any) -> None:
        if not self.enabled:
            return
        self.manifest.update(status=status, end_time=time.time(), **extra)
        self._write_manifest()

    def update_manifest(self, **extra: Any) -> None:
        if not self.enabled:
            return
        self.manifest.update(**extra)
        self._write_manifest()

    # ---- metrics ----
    def truncate_metrics(self, last_step: int) -> None:
        """On resume: keep only complete rows with step <= last_step (atomic rewrite)."""
        if not self.enabled:
            return
        path = self.dir / schema.METRICS
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= last_step:
                keep.append(line)
        atomic_write_text(path, "".join(x + "\n" for x in keep))
        tokens = self.dir / schema.TOKENS_DIR
        if tokens.is_dir():
            for f in tokens.glob("step-*.parquet"):
                if int(f.stem.split("-")[1]) > last_step:
                    f.unlink()

    def log_metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(row, default=_json_default, allow_nan=True)
        with open(self.dir / schema.METRICS, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_tokens(self, step: int, frame) -> None:
        """frame: a pandas DataFrame with the token columns of analysis.schema."""
        if not self.enabled or frame is None or len(frame) == 0:
            return
        out = self.dir / schema.tokens_file(step)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".parquet.tmp")
        try:
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, out)
        except BaseException:  # as atomic_write_text: never leave the temporary file behind
            tmp.unlink(missing_ok=True)
            raise


# Fields a --resume may change: runs may extend; how checkpoints are written (a run from before
# log.checkpoint_format existed resumes under the new default) changes no step's result; nor do
# the rollout servers (rollout.server, a whole section: a resume may use new ones).
RESUMABLE_FIELDS = ("train.max_steps", "log.checkpoint_format", "log.async_save",
                    "log.export_every", "rollout.server")


def _recipe_diff(old_yaml: str, new_yaml: str) -> str:
    """Fields that differ between two resolved recipes, ignoring RESUMABLE_FIELDS."""
    import yaml

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(yaml.safe_load(old_yaml) or {}), flat(yaml.safe_load(new_yaml) or {})
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
