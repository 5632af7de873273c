"""What the loop carries between steps (checkpointed), and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from analysis import schema

from .. import algo


@dataclass
class LoopState:
    step: int = 0
    entropy_stats: algo.EntropyStats | None = None  # the last batch's (A samples with them)
    critical_threshold: float | None = None  # fixed at the first step
    last_val: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainSummary:
    run_dir: Path
    status: str
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    message: str = ""
    is_main: bool = True

    def line(self) -> str:
        parts = [f"run {self.status}: {self.run_dir}", f"steps {self.steps}"]
        for k in ("val_greedy", "val_avg", schema.REWARD_ACC, schema.ENTROPY_MEAN):
            if k in self.final and self.final[k] is not None:
                parts.append(f"{k} {self.final[k]:.3f}")
        if self.message:
            parts.append(self.message)
        return " | ".join(parts)
