"""hapo_cli/learner/zero_state.py: which world a checkpoint's ZeRO partitions belong to, the
one-line refusals, and `weights_only` loading that admits DeepSpeed's own classes only. The
save/reload of real partitions runs in tests/test_strategy.py (2 gloo processes) and
tests/test_strategy_e2e.py (`hapo train` under ZeRO-2, kill -9 + resume)."""

from __future__ import annotations

import datetime

import pytest
import torch

from hapo_cli.errors import HapoError
from hapo_cli.learner import zero_state


def _touch(folder, *names):
    for n in names:
        torch.save({"x": torch.zeros(1)}, folder / n)


def test_rank_file_names_sort_by_rank():
    names = [zero_state.rank_file(r, 12) for r in (10, 2, 0)]
    assert names == ["zero-optim-rank00010-of-00012.pt", "zero-optim-rank00002-of-00012.pt",
                     "zero-optim-rank00000-of-00012.pt"]
    assert sorted(names)[0].endswith("rank00000-of-00012.pt")
    assert all(zero_state.PATTERN.match(n) for n in names)


def test_written_world(tmp_path):
    _touch(tmp_path, "optimizer.pt", "scheduler.pt")
    assert zero_state.written_world(tmp_path) is None
    _touch(tmp_path, zero_state.rank_file(0, 2), zero_state.rank_file(1, 2))
    assert zero_state.written_world(tmp_path) == 2
    _touch(tmp_path, zero_state.rank_file(0, 4))
    with pytest.raises(ValueError, match=r"different world sizes \[2, 4\]"):
        zero_state.written_world(tmp_path)


def test_check_world_names_the_number_of_ranks(tmp_path):
    with pytest.raises(HapoError, match="not written under DeepSpeed"):
        zero_state.check_world(tmp_path, 2)
    _touch(tmp_path, *(zero_state.rank_file(r, 4) for r in range(4)))
    zero_state.check_world(tmp_path, 4)
    with pytest.raises(HapoError, match=r"for 4 ranks, this run has 2; resume with "
                                        r"--num_processes 4"):
        zero_state.check_world(tmp_path, 2)


def test_weights_only_loading_admits_deepspeed_classes_only(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is an extra: pip install -e '.[deepspeed]'")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / zero_state.rank_file(0, 1)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "fp32": [torch.arange(3.0)]}, good)
    sd = zero_state.load_file(good)
    assert isinstance(sd["loss_scaler"], LossScaler) and sd["zero_stage"] == 2
    assert sd["fp32"][0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(Exception, match="datetime"):  # anything else is still refused
        bad = tmp_path / zero_state.rank_file(0, 2)
        torch.save({"x": datetime.datetime(2026, 1, 1)}, bad)
        zero_state.load_file(bad)
    with pytest.raises(Exception, match="LossScaler"):  # ...and outside the context too
        torch.load(good, weights_only=True)
