"""Answer verifiers: "exact" for the synthetic tasks, "math" through math-verify, "dapo" the
HAPO authors' `Answer:` grader (`dapo.py`: normalised string equality, then math-verify).

Timeouts. sympy can hang on adversarial strings, and math-verify's own timeouts use
`signal.alarm` (whole seconds, main thread only). We call math-verify with its timeouts off and
bound the whole parse + compare ourselves:

- main thread: a `signal.setitimer` alarm (fractional seconds) raising a BaseException, so no
  `except Exception` inside sympy/math-verify can swallow it; any alarm already armed by the
  caller (e.g. pytest-timeout) is restored with its remaining time afterwards;
- any other thread (signals cannot be used there): the check runs in a separate worker process
  (spawned once, reused), which applies the same alarm in its own main thread; if that worker
  does not answer in time it is killed and replaced. Slower (a process round trip) but never
  hangs the caller and never leaves a runaway thread behind.

A timeout counts as incorrect.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

from .mathverify import NO_TIMEOUT
from .mathverify import math_verify_module as _math_verify_module

logger = logging.getLogger("hapo.rewards")

Verifier = Literal["exact", "math", "dapo"]
_WORKER_GRACE_S = 60.0  # worker start-up (imports sympy) on top of the timeout


class _VerifyTimeout(BaseException):
    """Raised by our alarm; a BaseException so library `except Exception` blocks let it pass."""


def final_answer(response: str) -> str | None:
    """The text after the last '#', stripped; None when there is no '#'."""
    if "#" not in response:
        return None
    return response.rsplit("#", 1)[1].strip()


def last_boxed(response: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced), stripped; None when absent."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(response)):
        depth += {"{": 1, "}": -1}.get(response[j], 0)
        if depth == 0:
            return response[i:j].strip()
    return None


def extract_answer(verifier: Verifier, response: str) -> str | None:
    """The answer a response commits to, for majority voting (maj@k): the text after the last
    '#' for synthetic tasks, the last `\\boxed{}` for math, the normalised `Answer:` line for
    dapo. None = no vote."""
    if verifier == "dapo":
        from .dapo import INVALID, dapo_prediction

        got = dapo_prediction(response)
        return None if got in ("", INVALID) else got
    got = final_answer(response) if verifier == "exact" else last_boxed(response)
    return got or None


def verify_exact(response: str, answer: str) -> bool:
    """Synthetic tasks: the final answer (after the last '#') equals `answer` exactly."""
    got = final_answer(response)
    return got is not None and got != "" and got == answer.strip()




# Parsed ground truths, by answer string: a prompt's G responses share one parse. An entry
# left at _PARSING means a parse that never finished (timed out): that answer is not parsed
# again, so one hostile row costs one timeout, not one per response. Bounded: cleared when full.
_PARSING = object()
_GOLD_CACHE: dict[str, Any] = {}
_GOLD_CACHE_MAX = 4096


def _parse_gold(answer: str) -> Any:
    """math-verify's parse of the ground truth (`\\boxed{answer}`, then plain), cached."""
    cached = _GOLD_CACHE.get(answer)
    if cached is not None:
        return cached
    if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
        _GOLD_CACHE.clear()
    _GOLD_CACHE[answer] = _PARSING
    mv = _math_verify_module()
    latex, expr = mv.LatexExtractionConfig, mv.ExprExtractionConfig
    gold = mv.parse("\\boxed{" + answer + "}", [latex()], parsing_timeout=NO_TIMEOUT)
    if not gold:
        gold = mv.parse(answer, [latex(), expr()], parsing_timeout=NO_TIMEOUT)
    _GOLD_CACHE[answer] = gold
    return gold


def _math_equal(response: str, answer: str) -> bool:
    """math-verify: gold parsed as `\\boxed{answer}`, prediction from `\\boxed{}` first, then
    any LaTeX or plain expression; equivalence by string, numeric or sympy comparison."""
    mv = _math_verify_module()
    latex, expr = mv.LatexExtractionConfig, mv.ExprExtractionConfig
    gold = _parse_gold(answer)
    if gold is _PARSING or not gold:
        return False
    pred = mv.parse(response, [latex(boxed_match_priority=0), expr()],
                    parsing_timeout=NO_TIMEOUT)
    if not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=None))


def _with_alarm(timeout: float, fn, *args) -> bool:
    """fn(*args) under a SIGALRM interval timer (main thread only); False on timeout."""

    def on_alarm(signum, frame):
        raise _VerifyTimeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn(*args)
    except _VerifyTimeout:
        logger.debug("verification timed out after %.1fs", timeout)
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # re-arm the caller's alarm with what was left of it
            left = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def _math_equal_in_worker(response: str, answer: str, timeout: float) -> bool:
    _math_verify_module()  # import sympy before the alarm: on a loaded machine it takes seconds
    return _with_alarm(timeout, _math_equal, response, answer)


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        import multiprocessing

        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def _kill_worker_pool() -> None:
    global _pool
    if _pool is not None:
        for proc in list(getattr(_pool, "_processes", {}).values()):
            proc.kill()
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _call_in_worker(fn, args: tuple, wait_s: float, default: bool = False) -> bool:
    """bool(fn(*args)) in the worker process; `default` if it fails or takes over `wait_s`
    (the worker is then killed and a fresh one spawned on the next call)."""
    with _pool_lock:  # one request at a time: the worker is single and may be replaced
        future = _worker_pool().submit(fn, *args)
        try:
            return bool(future.result(timeout=wait_s))
        except FutureTimeout:
            logger.warning("verification worker did not answer in %.1fs; restarting it", wait_s)
            _kill_worker_pool()
            return default
        except Exception:  # a crashed worker (BrokenProcessPool) counts as incorrect
            logger.warning("verification worker failed; restarting it", exc_info=True)
            _kill_worker_pool()
            return default


def verify_math(response: str, answer: str, timeout: float = 5.0) -> bool:
    """math-verify equivalence of the response's final answer with `answer`, time-bounded."""
    if threading.current_thread() is threading.main_thread():
        return _with_alarm(timeout, _math_equal, response, answer)
    args = (response, answer, timeout)
    return _call_in_worker(_math_equal_in_worker, args, timeout + _WORKER_GRACE_S)


def _dapo_equal(response: str, answer: str) -> bool:
    from .dapo import INVALID, dapo_string_match, math_verify_boxed

    correct, pred = dapo_string_match(response, answer)
    if correct:
        return True
    return pred != INVALID and math_verify_boxed(pred, answer)


def _dapo_equal_in_worker(response: str, answer: str, timeout: float) -> bool:
    _math_verify_module()  # as _math_equal_in_worker
    return _with_alarm(timeout, _dapo_equal, response, answer)


def verify_dapo(response: str, answer: str, timeout: float = 5.0) -> bool:
    """The authors' grader (`dapo.py`): the last `Answer:` line of the last 300 characters,
    normalised string equality, else math-verify on the boxed prediction; time-bounded."""
    if threading.current_thread() is threading.main_thread():
        return _with_alarm(timeout, _dapo_equal, response, answer)
    args = (response, answer, timeout)
    return _call_in_worker(_dapo_equal_in_worker, args, timeout + _WORKER_GRACE_S)


# verifier name -> (response, answer, timeout) -> correct. Adding a reward: one entry here
# (and its name in `Verifier` and the data section's choices).
VERIFIERS = {
    "exact": lambda response, answer, timeout: verify_exact(response, answer),
    "math": verify_math,
    "dapo": verify_dapo,
}


def verify(verifier: Verifier, response: str, answer: str, timeout: float = 5.0) -> bool:
    """Whether `response` answers `answer` correctly under `verifier` (a VERIFIERS name)."""
    if timeout <= 0:
        raise ValueError(f"verify: timeout={timeout} must be > 0 seconds")
    if verifier not in VERIFIERS:
        raise ValueError(
            f"verify: unknown verifier '{verifier}' (expected one of: {', '.join(VERIFIERS)})"
        )
    return VERIFIERS[verifier](response, answer, timeout)
