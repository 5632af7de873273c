"""`ServerProcess`: the one owner of a vLLM server process (STYLE: processes you start are
processes you stop).

    with ServerProcess(cmd, env, url, log_path=run_dir / "server-0.log", pid_file=...) as server:
        server.wait_ready(timeout_s=300)      # /health answers, or one line naming the URL
        ...
    # stopped here: on return, on an exception, on Ctrl-C

The command runs under `hapo_cli.serve.guard` in a new session (its own process group), so the
owner ends the server and everything it started with one `killpg`; and because the guard watches
a pipe from the owner, a SIGKILLed owner (no `finally` runs) still leaves no process behind. The
group's id goes to `pid_file` (JSON lines) so a later command can stop a leftover
(`stop_leftovers`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import HapoError

GUARD = "hapo_cli.serve.guard"


class ServerProcess:
    """A server command run in its own process group under the guard (see the module docstring)."""

    def __init__(self, cmd: list[str], env: dict[str, str], url: str, *,
                 log_path: Path | None = None, pid_file: Path | None = None,
                 grace_s: float = 10.0) -> None:
        self.cmd, self.env, self.url = cmd, env, url
        self.log_path, self.pid_file, self.grace_s = log_path, pid_file, grace_s
        self.proc: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        env = {**os.environ, **self.env, "HAPO_GUARD_GRACE_S": str(self.grace_s)}
        out = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", GUARD, "--", *self.cmd], stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        if self.pid_file is not None:
            with open(self.pid_file, "a") as f:
                f.write(json.dumps({"pgid": self.proc.pid, "url": self.url}) + "\n")
        return self

    def stop(self) -> None:
        """End the group: close the guard's pipe (it sends SIGTERM, then SIGKILL after the
        grace period), then SIGKILL the group ourselves if it outlives that."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        assert proc.stdin is not None  # started with stdin=PIPE
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=self.grace_s + 5)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(proc.pid, 10.0)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------

    @property
    def pgid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Until `GET /health` answers 200; one line naming the URL (and the log's last line)
        when the deadline passes or the server exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise HapoError(f"vLLM server {self.url} exited while starting{self._log_tail()}")
            if health(self.url, timeout_s=2.0):
                return
            time.sleep(0.5)
        raise HapoError(f"vLLM server {self.url} did not answer /health within {timeout_s:.0f} s"
                        f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines()
                 if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln.strip())]
        last = (errors or lines or [""])[-1].strip()[:200]
        return f" ({last}; log: {self.log_path})" if last else f" (log: {self.log_path})"


def health(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (a zombie holds nothing; it waits
    for its reaper)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Until no live process is left in group `pgid` (SIGKILLed members take a moment to exit,
    and the guard's children can outlive a guard killed first), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while live_members(pgid) and time.monotonic() < deadline:
        _kill_group(pgid)
        time.sleep(0.1)


def _is_guard(pid: int) -> bool:
    try:
        return GUARD.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_leftovers(pid_file: Path) -> int:
    """SIGKILL the groups a previous command recorded in `pid_file` that are still running
    (checked to be a hapo guard, not a reused pid); the file is then removed. Returns how many."""
    if not pid_file.is_file():
        return 0
    n = 0
    for line in pid_file.read_text().splitlines():
        try:
            pgid = int(json.loads(line)["pgid"])
        except (ValueError, KeyError, TypeError):
            continue
        if _is_guard(pgid):
            _kill_group(pgid)
            n += 1
    pid_file.unlink(missing_ok=True)
    return n
