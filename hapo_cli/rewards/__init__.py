"""Rewards: answer verifiers (exact for synthetic tasks, math-verify for math) and DAPO's
overlong shaping."""

from .shaping import overlong_penalty, score_responses
from .verify import final_answer, verify, verify_exact, verify_math

__all__ = [
    "final_answer",
    "overlong_penalty",
    "score_responses",
    "verify",
    "verify_exact",
    "verify_math",
]
