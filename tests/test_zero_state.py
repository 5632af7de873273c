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


# ---- hapo_cli/learner/zero_checkpoint.py: DeepSpeed's own per-rank format ----------------------
# (real files from `engine.save_checkpoint` are written, resumed, exported and cut short in
# tests/test_strategy_e2e.py; here its probe and refusals on hand-made folders)

def _zero_ckpt(tmp_path, world=2, ranks=(0, 1)):
    from hapo_cli.models import build_tokenizer

    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    (ckpt / "zero").mkdir(parents=True)
    for r in ranks:
        torch.save({"dp_world_size": world, "module": {},
                    "ds_config": {"zero_optimization": {"stage": 3}}},
                   ckpt / "zero" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"x": torch.zeros(2)}},
                   ckpt / "zero" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (ckpt / "config.json").write_text('{"model_type": "qwen2"}')
    build_tokenizer().save_pretrained(ckpt)
    return ckpt


def test_zero_format_is_recognised_and_probed(tmp_path):
    from hapo_cli.learner import zero_checkpoint as zc

    ckpt = _zero_ckpt(tmp_path)
    assert zc.is_zero(ckpt) and zc.is_sharded(ckpt) and zc.written_world(ckpt) == 2
    zc.probe_zero(ckpt)
    assert not zc.is_zero(tmp_path) and not zc.is_zero(ckpt / "zero")


def test_zero_probe_names_a_missing_rank_a_refused_pickle_and_the_config(tmp_path):
    from hapo_cli.learner import zero_checkpoint as zc

    ckpt = _zero_ckpt(tmp_path / "a", ranks=(0,))  # rank 1 never wrote
    with pytest.raises(ValueError, match=r"^zero/: no partition of rank 1 \(of 2\)$"):
        zc.probe_zero(ckpt)
    ckpt = _zero_ckpt(tmp_path / "b")
    bad = ckpt / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"when": datetime.datetime(2026, 1, 1)}, bad)  # not a global weights_only allows
    with pytest.raises(ValueError, match=rf"^zero/{bad.name}: cannot be loaded safely "
                                         r"\(UnpicklingError\)$"):
        zc.probe_zero(ckpt)
    ckpt = _zero_ckpt(tmp_path / "c")
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):
        zc.probe_zero(ckpt)


@pytest.mark.parametrize(("kind", "world", "stage", "why"), [
    ("fsdp2", 2, 3, "which fsdp2 cannot resume"), ("ddp", 1, 3, "which ddp cannot resume"),
    ("deepspeed", 4, 3, "this run has 4"),
    ("deepspeed", 2, 2, "written under ZeRO-3, this run is ZeRO-2")])
def test_zero_format_elsewhere_is_one_line_naming_the_conversion(tmp_path, kind, world, stage,
                                                                   why):
    from types import SimpleNamespace

    from hapo_cli.learner import zero_checkpoint as zc

    ckpt = _zero_ckpt(tmp_path)
    assert zc.written_stage(ckpt) == 3
    engine = SimpleNamespace(zero_optimization_stage=lambda: stage)
    acc = SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    with pytest.raises(HapoError) as info:
        zc.load_into_strategy(ckpt, SimpleNamespace(kind=kind, world=world, accelerator=acc))
    msg = str(info.value)
    assert "\n" not in msg and f"for 2 ranks ({why})" in msg
    assert "--config_file recipes/accelerate/zero3.yaml --num_processes 2" in msg
    assert f"hapo export {tmp_path / 'run'} --step 3 --out DIR" in msg
    assert "--set model.path=DIR" in msg
