"""Rewards: answer verifiers (exact for synthetic tasks, math-verify for math) and DAPO's
overlong shaping.

`shaping` (which needs torch) is imported on first use, so the verification worker process
(see `verify.py`) starts without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .verify import extract_answer, final_answer, verify, verify_exact, verify_math

if TYPE_CHECKING:
    from .shaping import overlong_penalty, score_responses

__all__ = [
    "extract_answer",
    "final_answer",
    "overlong_penalty",
    "score_responses",
    "verify",
    "verify_exact",
    "verify_math",
]


def __getattr__(name: str) -> Any:
    if name in ("overlong_penalty", "score_responses"):
        from . import shaping

        return getattr(shaping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
