"""Two prompt streams per run, so that dynamic sampling does not shift the prompt order.

The primary stream supplies the first generation batch of every step; the refill stream supplies
the extra batches dynamic sampling asks for. Every variant of an ablation with the same seed
therefore sees the same primary prompts at the same step, whatever its filter kept.
"""

from __future__ import annotations

from typing import Any

from ..data import build_train_stream

REFILL_SEED_OFFSET = 1_000_000_007


class TrainStreams:
    def __init__(self, primary, refill):
        self.primary = primary
        self.refill = refill

    def next_batch(self, n: int, refill: bool = False) -> list[Any]:
        return (self.refill if refill else self.primary).next_batch(n)

    def state_dict(self) -> dict[str, Any]:
        return {"primary": self.primary.state_dict(), "refill": self.refill.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.primary.load_state_dict(state["primary"])
        self.refill.load_state_dict(state["refill"])


def build_streams(data_cfg, tokenizer, seed: int) -> TrainStreams:
    return TrainStreams(
        build_train_stream(data_cfg, tokenizer, seed),
        build_train_stream(data_cfg, tokenizer, seed + REFILL_SEED_OFFSET),
    )
