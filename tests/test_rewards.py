"""Verifiers (exact, math-verify with timeouts) and DAPO overlong shaping."""

from __future__ import annotations

import importlib
import signal
import threading
import time

import pytest
import torch

from hapo_cli.data import Example
from hapo_cli.recipe import OverlongConfig
from hapo_cli.rewards import final_answer, overlong_penalty, score_responses, verify

# the module, not the function of the same name that hapo_cli.rewards re-exports
verify_mod = importlib.import_module("hapo_cli.rewards.verify")

# sympy needs far longer than 0.5 s to compare a power tower with 1 (measured: > 1 s)
HANGS = ("\\boxed{9^{9^{9^{9}}}}", "1")


def test_exact_verifier():
    assert final_answer("47+38=85;85-19=66;#66") == "66"
    assert final_answer("no hash") is None
    assert verify("exact", "47+38=85;85-19=66;#66", "66")
    assert verify("exact", "47+38=85;85-19=66;# 66 ", "66")  # stripped
    assert not verify("exact", "47+38=85;85-19=66;#67", "66")
    assert not verify("exact", "47+38=85;85-19=66", "66")  # no final answer written
    assert not verify("exact", "#", "")  # an empty answer is never right
    assert verify("exact", "1#2;#66", "66")  # the last '#' counts
    assert not verify("exact", "#066", "66")  # exact, not numeric


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("\\boxed{1/2}", "0.5", True),
        ("\\frac{1}{2}", "0.5", True),
        ("so the answer is $\\frac{1}{2}$.", "0.5", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\frac12}", "1/2", True),
        ("The answer is \\boxed{34}", "34", True),
        ("\\boxed{3}", "4", False),
        ("I don't know", "4", False),
        ("", "4", False),
    ],
)
def test_math_verifier(response, answer, expected):
    assert verify("math", response, answer) is expected


def test_unknown_verifier_and_bad_timeout():
    with pytest.raises(ValueError, match="unknown verifier 'fuzzy'"):
        verify("fuzzy", "1", "1")
    with pytest.raises(ValueError, match="timeout=0"):
        verify("math", "1", "1", timeout=0)


def test_math_timeout_in_main_thread_keeps_callers_alarm():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)  # the caller's own alarm (as pytest-timeout)
        t0 = time.monotonic()
        assert verify("math", *HANGS, timeout=0.5) is False
        assert time.monotonic() - t0 < 5.0
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < left <= 30.0  # re-armed with what was left of it
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_math_off_main_thread_uses_worker_process():
    results = {}

    def run():
        results["ok"] = verify("math", "\\boxed{1/2}", "0.5")
        results["bad"] = verify("math", "\\boxed{3}", "4")
        results["hang"] = verify("math", *HANGS, timeout=0.5)

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=120)
    assert results == {"ok": True, "bad": False, "hang": False}


def test_worker_that_does_not_answer_is_killed_and_replaced():
    t0 = time.monotonic()
    assert verify_mod._call_in_worker(time.sleep, (60,), wait_s=0.5) is False
    assert time.monotonic() - t0 < 10.0
    assert verify_mod._pool is None  # killed; the next call spawns a fresh worker
    assert verify_mod._call_in_worker(verify_mod.verify_exact, ("#7", "7"), wait_s=60) is True


def test_overlong_penalty_hand_values():
    # max_len 32, buffer 8 -> no penalty up to 24 tokens, then -(len - 24)/8 * penalty
    got = overlong_penalty([10, 24, 25, 28, 32, 40], max_len=32, buffer_len=8, penalty=1.0)
    # 25: -1/8 = -0.125; 28: -4/8 = -0.5; 32: -8/8 = -1; 40 (past max_len) clamped to -1
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.5, -1.0, -1.0]))
    assert got.dtype == torch.float32
    # penalty 0.5, buffer 4 of max 10: 8 -> -(8-6)/4*0.5 = -0.25
    torch.testing.assert_close(
        overlong_penalty(torch.tensor([6, 8]), 10, 4, 0.5), torch.tensor([0.0, -0.25])
    )
    torch.testing.assert_close(overlong_penalty([9, 10], 10, 0, 1.0), torch.zeros(2))
    with pytest.raises(ValueError, match="buffer_len < max_len"):
        overlong_penalty([1], 8, 8, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        overlong_penalty([[1]], 8, 2, 1.0)


def _ex(answer: str, verifier: str = "exact") -> Example:
    return Example("u", "p", (1,), answer, verifier, None, "t")


def test_score_responses():
    examples = [_ex("66"), _ex("66"), _ex("0.5", "math"), _ex("7")]
    texts = ["47+38=85;85-19=66;#66", "#65", "\\boxed{1/2}", "#7"]
    lengths = [22, 30, 12, 32]
    cfg = OverlongConfig(enabled=True, buffer_len=8, penalty=1.0)
    scores, acc = score_responses(examples, texts, lengths, 32, cfg)
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    # penalties: 22 -> 0, 30 -> -(30-24)/8 = -0.75, 12 -> 0, 32 -> -1
    torch.testing.assert_close(scores, torch.tensor([1.0, -0.75, 1.0, 0.0]))
    scores_off, _ = score_responses(examples, texts, lengths, 32, OverlongConfig(enabled=False))
    torch.testing.assert_close(scores_off, acc)
    with pytest.raises(ValueError, match="must all have B entries"):
        score_responses(examples[:2], texts, lengths, 32, cfg)


def test_extract_answer_for_majority_voting():
    from hapo_cli.rewards import extract_answer

    # synthetic: the text after the last '#'; different step texts, same answer -> same vote
    assert extract_answer("exact", "47+38=85;85-19=66;#66") == "66"
    assert extract_answer("exact", "40+45=85;85-19=66;#66") == "66"
    assert extract_answer("exact", "47+38=85;85-19=66") is None
    assert extract_answer("exact", "1+1=2;#") is None  # empty answer: no vote
    # math: the last \boxed{}, braces balanced
    assert extract_answer("math", r"so \boxed{1} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_answer("math", r"\boxed{x") is None
    assert extract_answer("math", "no box") is None
