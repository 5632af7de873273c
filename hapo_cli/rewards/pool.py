"""Worker processes that run user reward functions, each call under a deadline.

A call that does not answer within `timeout` seconds costs that long: its worker is killed and
a fresh one started (a hung Python function cannot be interrupted from outside its process).
Workers are spawned (no forked CUDA or thread state), load every function once at start, and
exit when their pipe closes, so a parent killed by SIGKILL leaves none behind. The pool is a
context manager; `close()` stops its workers.
"""

from __future__ import annotations

import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from ..errors import HapoError

START_TIMEOUT_S = 120.0  # a worker's start-up: Python, this package and the user's imports


def _worker_main(conn, refs: list[tuple[str, str]]) -> None:
    from .plugins import load_function, run_call

    fns: list[Any] = []
    errors: dict[int, str] = {}
    for i, (ref, _style) in enumerate(refs):
        try:
            fns.append(load_function(ref))
        except BaseException as err:  # the user's module may even sys.exit()
            fns.append(None)
            text = str(err).strip().splitlines()
            errors[i] = f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
    conn.send(("ready", errors))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task, i, kwargs, n = msg
        conn.send((task, run_call(fns[i], refs[i][1], kwargs, n)))


class _Worker:
    def __init__(self, ctx, refs: list[tuple[str, str]]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, refs), daemon=True,
                                name="hapo-reward-worker")
        self.proc.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise HapoError(f"reward worker did not start within {START_TIMEOUT_S:g}s")
        try:
            _, self.load_errors = self.conn.recv()
        except EOFError:
            self.kill()
            raise HapoError("reward worker exited while importing the reward functions "
                            f"(exit code {self.proc.exitcode})") from None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardPool:
    """`workers` processes running the functions `refs` = [(function, style)]."""

    def __init__(self, refs: list[tuple[str, str]], workers: int, timeout: float) -> None:
        import multiprocessing

        if workers < 1 or timeout <= 0:
            raise ValueError(f"RewardPool: workers={workers} >= 1 and timeout={timeout} > 0")
        self.refs, self.timeout = list(refs), float(timeout)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(self._ctx, self.refs)]
        self.load_errors: dict[int, str] = self._workers[0].load_errors
        self._size = workers

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.kill()
        self._workers = []

    def run(self, calls: list[tuple[int, dict[str, Any], int]]) -> list[tuple[str, Any]]:
        """One result per call (fn index, kwargs, n): ("ok", value) or (kind, one line), kind in
        signature, raised, shape, timeout, crashed. Calls run `workers` at a time."""
        while len(self._workers) < min(self._size, len(calls)):
            self._workers.append(_Worker(self._ctx, self.refs))
        results: list[Any] = [None] * len(calls)
        pending = deque(range(len(calls)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (call, deadline)
        while pending or busy:
            for slot in range(len(self._workers)):
                if slot not in busy and pending:
                    t = pending.popleft()
                    self._workers[slot].conn.send((t, *calls[t]))
                    busy[slot] = (t, time.monotonic() + self.timeout)
            soonest = min(d for _, d in busy.values())
            ready = wait([self._workers[s].conn for s in busy], max(soonest - time.monotonic(), 0))
            for slot in list(busy):
                w, (t, deadline) = self._workers[slot], busy[slot]
                if w.conn in ready:
                    try:
                        got, results[t] = w.conn.recv()
                        assert got == t
                    except (EOFError, OSError):
                        results[t] = ("crashed", f"its worker died (exit code {w.proc.exitcode})")
                        self._replace(slot)
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    results[t] = ("timeout", f"did not return within {self.timeout:g}s")
                    self._replace(slot)
                    del busy[slot]
        return results

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._ctx, self.refs)
