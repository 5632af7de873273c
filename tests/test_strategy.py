"""Learner strategies (hapo_cli/learner/strategy.py): one optimizer step of a tiny Qwen2 under one
process, DDP and FSDP2 (2 gloo processes, via tests/strategy_worker.py), compared with each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import failure_report
from strategy_worker import DONE  # tests/ is on sys.path (pytest's rootdir-less import)
from torch.testing import assert_close

WORKER = Path(__file__).with_name("strategy_worker.py")


def _run_worker(out: Path, nproc: int, *cases: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(WORKER), str(out), *cases]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, failure_report(res, DONE)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies")
    _run_worker(out, 2, "ddp:float32:1e-3", "fsdp2:float32:1e-3", "ddp:bfloat16:1e-6",
                "fsdp2:bfloat16:1e-6")
    _run_worker(out, 1, "ddp:bfloat16:1e-6")  # one process: the "single" strategy

    def load(tag):
        return json.loads((out / f"{tag}.json").read_text()), torch.load(out / f"{tag}.pt")

    return {tag: load(tag) for tag in ("ddp-float32-2", "fsdp2-float32-2", "ddp-bfloat16-2",
                                       "fsdp2-bfloat16-2", "single-bfloat16-1")}


@pytest.mark.slow
def test_fsdp2_shards_parameters_and_ddp_does_not(results):
    fsdp, _ = results["fsdp2-float32-2"]
    ddp, _ = results["ddp-float32-2"]
    total = fsdp["total_param_bytes"]
    assert fsdp["describe"]["param_class"] == "DTensor" and fsdp["describe"]["sharded"]
    # each rank holds half of every parameter (dim-0 shards; the tiny model's dims are even,
    # so there is no padding and the halves are exact)
    assert fsdp["local_bytes"] == [total // 2, total // 2]
    assert ddp["describe"]["param_class"] == "Parameter" and not ddp["describe"]["sharded"]
    assert ddp["local_bytes"] == [total, total]


@pytest.mark.slow
def test_gathered_weights_are_the_unsharded_model(results):
    # full_named_parameters (what the rollout engine receives): every name, bit-identical
    for tag in ("ddp-float32-2", "fsdp2-float32-2", "fsdp2-bfloat16-2"):
        res, _ = results[tag]
        assert res["gather_keys_ok"], tag
        assert res["gather_max_abs_diff"] == 0.0, tag


@pytest.mark.slow
def test_fsdp2_step_equals_ddp_step(results):
    # fp32, 2 micro-batches, fused log-probs: the same gradient up to summation order, so the
    # same AdamW step (lr 1e-3; default float32 tolerances, atol 1e-5 = 1 % of one step)
    ddp, w_ddp = results["ddp-float32-2"]
    fsdp, w_fsdp = results["fsdp2-float32-2"]
    assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5)
    assert w_ddp.keys() == w_fsdp.keys()
    for k in w_ddp:
        assert_close(w_fsdp[k], w_ddp[k], msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["single-bfloat16-1", "ddp-bfloat16-2", "fsdp2-bfloat16-2"])
def test_bf16_compute_keeps_fp32_masters(results, tag):
    res, _ = results[tag]
    d = res["describe"]
    assert d["strategy"] == tag.split("-")[0]
    assert d["param_dtype"] == d["master_dtype"] == d["optimizer_state_dtype"] == "float32"
    assert d["compute_dtype"] == "bfloat16" and d["mixed_precision"] == "bf16"
    # one AdamW step at the paper's lr 1e-6 moves every entry with a gradient by ~1e-6: fp32
    # masters keep it (bf16 weights do not, see the next test)
    assert res["changed_frac"] >= 0.99


def test_bf16_weights_lose_an_lr_1e6_step():
    """The contrast that makes the test above meaningful: AdamW on bf16 parameters."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(512, 512, generator=g) * 0.02).bfloat16().requires_grad_()
    opt = torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0)
    before = w.detach().clone()
    w.grad = torch.randn(512, 512, generator=g).bfloat16()
    opt.step()
    changed = float((w.detach() != before).float().mean())
    assert changed < 0.05  # bf16 spacing near 0.02 is ~1e-4 >> 1e-6: almost nothing moves


@pytest.mark.slow
def test_fsdp2_optimizer_state_is_gathered_and_reloaded_per_rank(results):
    res, _ = results["fsdp2-float32-2"]
    assert res["optim_full_shape"] == [32, 64]  # the full down_proj, not a (16, 64) shard
    assert res["optim_full_vs_gathered"] == 0.0
    # zeroed on every rank, reloaded from the full file: each rank got its own shard back
    assert res["optim_local_absmax"] > 0 and res["optim_reload_max_diff"] == 0.0


def test_precision_resolution():
    from hapo_cli.errors import HapoError
    from hapo_cli.learner.precision import resolve_precision

    assert resolve_precision("float32", "no").compute == torch.float32
    assert resolve_precision("bfloat16", "no").compute == torch.bfloat16
    assert resolve_precision("bfloat16", "bf16").mixed_precision == "bf16"
    assert resolve_precision("float32", "bf16").compute == torch.bfloat16
    for p in ("float32", "bfloat16", "float16"):
        assert resolve_precision(p, "no", cuda=True).master == torch.float32
    with pytest.raises(HapoError, match="disagree on the compute dtype"):
        resolve_precision("bfloat16", "fp16", cuda=True)
    # without CUDA accelerate computes fp16 in fp32: refused, naming the field
    with pytest.raises(HapoError, match=r"^model.dtype=float16: float16 compute needs a CUDA"):
        resolve_precision("float16", "no", cuda=False)
    with pytest.raises(HapoError, match=r"^train.mixed_precision=fp16: float16 compute needs"):
        resolve_precision("float32", "fp16", cuda=False)


def test_detect_kind_reads_the_accelerate_config(monkeypatch):
    from hapo_cli.errors import HapoError
    from hapo_cli.learner.strategy import detect_kind

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(k, raising=False)
    assert detect_kind(1) == "single" and detect_kind(2) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert detect_kind(2) == "fsdp2"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(HapoError, match="fsdp_version"):
        detect_kind(2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert detect_kind(2) == "deepspeed"


@pytest.fixture(scope="module")
def zero(tmp_path_factory, results):
    # deepspeed is a dev extra (pyproject.toml); its CPU accelerator talks gloo
    pytest.importorskip("deepspeed", reason="deepspeed is in the dev extras: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("zero")
    _run_worker(out, 2, "zero2:float32:1e-3", "zero3:float32:1e-3", "zero2:bfloat16:1e-6",
                "zero3:bfloat16:1e-6")
    return {f"{z}{suffix}": (json.loads((out / f"{z}-{dtype}-2.json").read_text()),
                             torch.load(out / f"{z}-{dtype}-2.pt"))
            for z in ("zero2", "zero3") for suffix, dtype in (("", "float32"),
                                                              ("-bf16", "bfloat16"))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_steps_once_per_mini_batch_with_ddp_gradients(results, zero, stage):
    """2 micro-batches per mini-batch through accelerate's DeepSpeed wrapper: the engine steps
    once (stepping per micro-batch gave 2 steps and a different update), and the step equals
    DDP's. Under ZeRO-3 the fused log-probs read lm_head.weight inside the head's forward,
    where it is gathered."""
    ddp, w_ddp = results["ddp-float32-2"]
    res, w = zero[stage]
    d = res["describe"]
    assert d["strategy"] == "deepspeed" and d["zero_stage"] == int(stage[-1])
    assert res["global_steps"] == 1
    assert res["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5)
    assert d["param_dtype"] == d["master_dtype"] == "float32"
    assert res["gather_keys_ok"] and res["gather_max_abs_diff"] == 0.0
    total = res["total_param_bytes"]
    assert res["local_bytes"] == ([total // 2] * 2 if stage == "zero3" else [total] * 2)
    for k in w_ddp:
        assert_close(w[k], w_ddp[k], msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_optimizer_partitions_round_trip_per_rank(zero, stage):
    """hapo_cli/learner/zero_state.py: each rank writes its own ZeRO partition (half of the fp32
    masters, its Adam moments), and after both were overwritten reloads them bit for bit."""
    res, _ = zero[stage]
    n_params = res["total_param_bytes"] // 4  # fp32
    assert res["zero_files"] == ["zero-optim-rank00000-of-00002.pt",
                                 "zero-optim-rank00001-of-00002.pt"]
    assert res["zero_master_numel"] == [n_params // 2, n_params // 2]
    assert res["zero_moment_tensors"] == [2, 2]  # exp_avg, exp_avg_sq of the flat partition
    assert res["zero_reload_max_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_async_save_holds_the_save_steps_partition(zero, stage):
    """hapo_cli/learner/zero_checkpoint.py: DeepSpeed's files written by a thread, each write a
    second late: the next optimizer step waits until they are on disk (rank 0's order of
    events), the step then moves the partition, and the checkpoint reloads the partition of the
    save step bit for bit."""
    res, _ = zero[stage]
    assert res["async_order_ok"], res["async_order"]
    assert res["async_next_step_moved"] > 0
    assert res["async_loaded_vs_saved"] == 0.0


def test_fsdp2_loading_makes_every_rank_load_the_weights(monkeypatch):
    """`fsdp_cpu_ram_efficient_loading: true` would leave ranks > 0 with unloaded weights
    (transformers expects an FSDP1 broadcast): while the policy loads under FSDP2 it is off,
    and afterwards as it was; other strategies leave it alone."""
    import os
    from types import SimpleNamespace

    from hapo_cli.learner.strategy import Strategy

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    acc = SimpleNamespace(num_processes=2)
    with Strategy("fsdp2", acc, None).loading():
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    with Strategy("ddp", acc, None).loading():
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_bf16_mode_keeps_fp32_masters(zero, stage):
    """DeepSpeed's bf16 mode on CPU: bf16 module parameters, fp32 masters and Adam state in
    the ZeRO optimizer; one step at lr 1e-6 moves >= 99 % of the masters (bf16 weights would
    keep almost none, test_bf16_weights_lose_an_lr_1e6_step), and they reload bit for bit."""
    res, _ = zero[f"{stage}-bf16"]
    d = res["describe"]
    assert (d["strategy"], d["zero_stage"]) == ("deepspeed", int(stage[-1]))
    assert d["param_dtype"] == d["compute_dtype"] == "bfloat16" and d["mixed_precision"] == "bf16"
    assert d["master_dtype"] == d["optimizer_state_dtype"] == "float32"
    assert res["global_steps"] == 1
    assert res["master_changed_frac_rank"] >= 0.99  # rank 0's partition
    assert res["zero_reload_max_diff"] == 0.0
