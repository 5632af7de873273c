"""Rewards of a batch of responses: correctness plus DAPO's overlong shaping.

Reward: score = (1 if correct else `incorrect_score`) + overlong penalty. The HAPO authors'
`math_dapo.compute_score` returns +1/-1 and their DAPO reward manager
(`verl/workers/reward_manager/dapo.py`) adds the overlong penalty to it, so the paper recipes set
`train.incorrect_score: -1`; the tiny recipes keep 0 (1/0 correctness). For group-normalised
advantages (GRPO, token-level group average) the two scales give the same advantages, since
(r - mean)/std is invariant to r -> 2r - 1, except for the overlong penalty: against a 0/1 gap a
full penalty of 1 is worth the whole correct/incorrect gap, against a +-1 gap only half of it.
Accuracy is always returned separately (dynamic sampling and `reward/acc` use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .verify import verify


def overlong_penalty(
    lengths: torch.Tensor | Sequence[int], max_len: int, buffer_len: int, penalty: float
) -> torch.Tensor:
    """DAPO soft overlong punishment, float32 (B,):

        R(y) = 0                                       if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache * p  if L_max - L_cache < |y| <= L_max
             = -p                                      if |y| > L_max

    with L_max = max_len, L_cache = buffer_len, p = penalty. buffer_len = 0 means no penalty.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)  # (B,)
    if lengths.dim() != 1:
        raise ValueError(f"overlong_penalty: lengths must be 1-D (B,), got {tuple(lengths.shape)}")
    if not 0 <= buffer_len < max_len:
        raise ValueError(
            f"overlong_penalty: need 0 <= buffer_len < max_len, got {buffer_len} and {max_len}"
        )
    if buffer_len == 0:
        return torch.zeros_like(lengths)
    exceed = lengths - (max_len - buffer_len)  # (B,) > 0 inside the buffer
    return (-exceed / buffer_len * penalty).clamp(min=-penalty, max=0.0)


def score_responses(
    examples_per_response: Sequence[Any],
    responses_text: Sequence[str],
    response_lengths: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    overlong_cfg: Any,
    timeout: float = 5.0,
    incorrect_score: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 (B,), acc float32 (B,)) for B responses.

    examples_per_response[i] is the `Example` response i answers (with .verifier, .answer);
    response_lengths are generated tokens including the end-of-sequence token (what the loss
    sees). acc = 1/0 correctness; scores = (1 where correct, else `incorrect_score`) +
    overlong_penalty(...) when overlong_cfg.enabled (an `OverlongConfig`).
    """
    n = len(responses_text)
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)  # (B,)
    if len(examples_per_response) != n or lengths.shape != (n,):
        raise ValueError(
            f"score_responses: {len(examples_per_response)} examples, {n} responses and "
            f"lengths of shape {tuple(lengths.shape)} must all have B entries"
        )
    acc = torch.tensor(
        [
            float(verify(ex.verifier, text, ex.answer, timeout))
            for ex, text in zip(examples_per_response, responses_text)
        ],
        dtype=torch.float32,
    )  # (B,)
    scores = torch.where(acc > 0, torch.ones_like(acc), torch.full_like(acc, incorrect_score))
    if overlong_cfg.enabled:
        scores += overlong_penalty(
            lengths, max_new_tokens, overlong_cfg.buffer_len, overlong_cfg.penalty
        )
    return scores, acc
