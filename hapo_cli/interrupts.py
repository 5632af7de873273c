"""Ctrl-C and SIGTERM end a run cleanly, once.

A terminal's Ctrl-C signals the whole foreground process group, and an ablation then also
asks each of its training processes to stop: a child can get SIGINT and SIGTERM within
milliseconds. The first signal raises KeyboardInterrupt; any later one, while that interrupt
is being handled (the manifest written `interrupted`, children stopped), is ignored, so the
clean-up is never itself cut short. A scheduler's kill or `timeout` is handled the same way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# shared by nested blocks: one interrupt per process. "exiting": the process ends once its
# command returns (`hapo` itself, not a library caller), so after an interrupt the signals stay
# ignored while it exits, and its exit code stays 130.
_state = {"depth": 0, "hit": False, "exiting": False}


def exit_after_interrupt() -> None:
    """Called by the console entry point: an interrupted command ends the process."""
    _state["exiting"] = True


def _handler(signum, frame):
    if _state["hit"]:
        return
    _state["hit"] = True
    raise KeyboardInterrupt


@contextmanager
def interrupt_once() -> Iterator[None]:
    """Inside, the first SIGINT or SIGTERM raises KeyboardInterrupt and later ones are ignored,
    in nested blocks too (main thread only; elsewhere a no-op). Leaving the outermost block
    restores the previous handlers and arms the next one (for `hapo` after an interrupt: it
    leaves them ignored, the process is exiting)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["hit"] and _state["exiting"]:
            old = dict.fromkeys(old, signal.SIG_IGN)
        for s, h in old.items():
            signal.signal(s, h)
        if _state["depth"] == 0:
            _state["hit"] = False
