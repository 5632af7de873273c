"""Padding helpers shared by the rollout engines and the learner (torch only).

Every batch here is a left-padded prompt (then, in the learner, a right-padded response), so
one function right-aligns rows and one counts positions over the real tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def left_pad(rows: Sequence[Tensor], value: float | int | bool, width: int | None = None) -> Tensor:
    """1-D rows right-aligned in a (B, width) tensor of `value` (dtype of the rows; width: the
    longest row by default)."""
    width = max(r.numel() for r in rows) if width is None else width
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, width - r.numel() :] = r
    return out


def left_pad_prompts(prompts: Sequence[Sequence[int] | Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), each (B, P) long: token ids right-aligned, 1 = real token."""
    rows = [torch.as_tensor(list(p) if not isinstance(p, Tensor) else p, dtype=torch.long)
            for p in prompts]
    return left_pad(rows, pad_id), left_pad([torch.ones_like(r) for r in rows], 0)


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) mask of a left-padded batch -> (B, L) long positions counted over real tokens
    (0 at each row's first real token, 0 on padding), as HF generate assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
