"""Ctrl-C, SIGTERM and the schedulers' warning signals end a run cleanly, once.

A terminal's Ctrl-C signals the whole foreground process group, and an ablation then also
asks each of its training processes to stop: a child can get SIGINT and SIGTERM within
milliseconds. The first signal raises KeyboardInterrupt; any later one, while that interrupt
is being handled (the manifest written `interrupted`, children stopped), is ignored, so the
clean-up is never itself cut short.

Preemption: a cluster stops a job with SIGTERM (Slurm preemption, `scontrol requeue`,
`scancel`, Ray's `stop_job`) and warns of its time limit with a signal chosen at submission
(`sbatch --signal=USR1@120`; submitit uses USR2). Inside `stop_after_step()` (the training
loop) these do not raise: the loop finishes the step it is on, writes a checkpoint and ends
`interrupted` with the reason, and `hapo train` exits with `EXIT_PREEMPTED`, so a launcher can
tell "requeue me" (75) from Ctrl-C (130) and from a failure (1).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# EX_TEMPFAIL (sysexits.h): stopped from outside after a checkpoint; rerun with --resume
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C

# the reason a signal gives (manifest `reason`); SIGINT is the user's Ctrl-C
REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted",
           signal.SIGUSR1: "time limit", signal.SIGUSR2: "time limit"}

# shared by nested blocks: one interrupt per process. "exiting": the process ends once its
# command returns (`hapo` itself, not a library caller), so after an interrupt the signals stay
# ignored while it exits, and its exit code stays. "defer": inside the training loop, where a
# preemption signal only asks for a stop after the current step; "signal": the first one seen.
_state: dict = {"depth": 0, "hit": False, "exiting": False, "defer": 0, "signal": None}


def exit_after_interrupt() -> None:
    """Called by the console entry point: an interrupted command ends the process."""
    _state["exiting"] = True


def _handler(signum, frame):
    if _state["hit"]:
        return
    _state["hit"] = True
    _state["signal"] = signal.Signals(signum)
    if _state["defer"] and signum != signal.SIGINT:
        return  # the loop sees stop_requested() after its step
    raise KeyboardInterrupt


def stop_requested() -> str | None:
    """The reason ('preempted', 'time limit') of a deferred stop request, None without one."""
    sig = _state["signal"]
    return REASONS[sig] if sig is not None and _state["defer"] and sig != signal.SIGINT else None


def interrupt_reason() -> tuple[str, str] | None:
    """(reason, signal name) of the signal that interrupted this process, None if none did."""
    sig = _state["signal"]
    return (REASONS[sig], sig.name) if sig is not None else None


def exit_code() -> int:
    """Exit code of an interrupted command: EXIT_PREEMPTED after SIGTERM/SIGUSR1/SIGUSR2,
    EXIT_INTERRUPTED after Ctrl-C."""
    sig = _state["signal"]
    return EXIT_PREEMPTED if sig is not None and sig != signal.SIGINT else EXIT_INTERRUPTED


@contextmanager
def stop_after_step() -> Iterator[None]:
    """Inside (the training loop), SIGTERM, SIGUSR1 and SIGUSR2 set `stop_requested()` instead
    of raising; Ctrl-C still raises at once."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


@contextmanager
def interrupt_once() -> Iterator[None]:
    """Inside, the first SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 raises KeyboardInterrupt (or, in
    `stop_after_step`, requests a stop) and later ones are ignored, in nested blocks too (main
    thread only; elsewhere a no-op). Leaving the outermost block restores the previous handlers
    and arms the next one (for `hapo` after an interrupt: it leaves them ignored, the process
    is exiting)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in REASONS}
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
            if not _state["exiting"]:
                _state["signal"] = None
