"""Comparing the metrics.jsonl rows of two runs that should agree (another world size, strategy,
engine or launcher): one helper for tests/ and tests_vllm/."""

from __future__ import annotations

import pytest


def assert_same_rows(a: list[dict], b: list[dict], *, rel: float = 1e-4, abs: float = 1e-6,
                     min_compared: int = 150) -> int:
    """Every row of `a` equals `b`'s at the same place: the same keys; floats within `rel` /
    `abs` (the callers justify theirs), everything else exactly; `time/*` skipped. Returns the
    number of values compared, and fails when fewer than `min_compared` were (a run that logs
    almost nothing must not pass by default)."""
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), (ra.get("step"), sorted(set(ra) ^ set(rb)))
        for k, va in ra.items():
            if k.startswith("time/"):
                continue
            if isinstance(va, float):
                assert rb[k] == pytest.approx(va, rel=rel, abs=abs), (ra.get("step"), k)
            else:
                assert rb[k] == va, (ra.get("step"), k)
            compared += 1
    assert compared >= min_compared, f"only {compared} values compared"
    return compared
