"""Accelerate learner: the training loop, batching, forward pass and checkpoints."""

from .trainer import LoopState, TrainSummary, run_dir_of, train

__all__ = ["train", "TrainSummary", "LoopState", "run_dir_of"]
