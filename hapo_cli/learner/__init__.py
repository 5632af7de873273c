"""Accelerate learner: the training loop, batching, forward pass and checkpoints.

No re-exports: importing one submodule (say `learner.checkpoint`, as `hapo export` does) must not
start the trainer, which imports most of the package (tests/test_architecture.py). The entry
point is `hapo_cli.learner.trainer.train`."""
