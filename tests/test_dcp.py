"""DCP checkpoints (hapo_cli/learner/dcp_checkpoint.py): each rank's shards save and load back
bit for bit on 1 and 2 processes, sync and async (the async write racing the next step), and
load into another layout (2 FSDP2 ranks -> 1 process, 1 -> 2, FSDP2 <-> DDP) exactly, then
continue like the run that wrote them. Workers: tests/dcp_worker.py under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import failure_report
from dcp_worker import DONE
from torch.testing import assert_close

WORKER = Path(__file__).with_name("dcp_worker.py")


def _run(out: Path, nproc: int, *cases: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(WORKER), str(out), *cases]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parent)
    assert res.returncode == 0, failure_report(res, DONE)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    # checkpoints 1 (one process, async), 2 (FSDP2 x 2, async), 3 (DDP x 2, sync); each then
    # loaded in another layout
    _run(out, 1, "save:single:async:1")
    _run(out, 2, "save:fsdp2:async:2", "save:ddp:sync:3", "load:fsdp2:1", "load:ddp:2",
         "load:fsdp2:3")
    _run(out, 1, "load:single:2")
    return out


def _res(out: Path, tag: str):
    return json.loads((out / f"{tag}.json").read_text()), torch.load(out / f"{tag}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["save-single-1-1", "save-fsdp2-2-2", "save-ddp-2-3"])
def test_save_then_load_is_bit_for_bit(results, tag):
    res, _ = _res(results, tag)
    assert res["reload_keys_equal"]
    assert res["reload_max_diff"] == 0.0  # every rank's own shards, after a step mutated them
    files = sorted(p.name for p in (results / "run/checkpoints" / f"step-{int(tag[-1]):06d}"
                                    / "dcp").iterdir())
    world = res["world"]
    assert files == [".metadata", *[f"__{r}_0.distcp" for r in range(world)]]  # one per rank


@pytest.mark.slow
@pytest.mark.parametrize("saved,loaded", [
    ("save-fsdp2-2-2", "load-single-1-2"),  # 2 FSDP2 ranks -> 1 process
    ("save-single-1-1", "load-fsdp2-2-1"),  # 1 process -> 2 FSDP2 ranks
    ("save-fsdp2-2-2", "load-ddp-2-2"),     # FSDP2 -> DDP
    ("save-ddp-2-3", "load-fsdp2-2-3"),     # DDP -> FSDP2
])
def test_resharded_load_is_exact_and_continues_the_same(results, saved, loaded):
    _, a = _res(results, saved)
    _, b = _res(results, loaded)
    assert a["first"].keys() == b["first"].keys()
    assert any(k.endswith("exp_avg_sq") for k in a["first"])
    for k in a["first"]:  # weights, both Adam moments and the step count, resharded exactly
        assert torch.equal(a["first"][k], b["first"][k]), k
    for k in (k for k in a["second"] if k.startswith("model.")):
        # the next step in the new layout: the same math, gradients reduced in another order
        # (one process sums all rows; DDP all-reduces, FSDP2 reduce-scatters halves), so fp32
        # sums differ in the last bits. Measured: FSDP2 <-> DDP 0.0, 2 ranks <-> 1 process
        # <= 1.8e-8 (k_proj.bias, whose gradient is rounding noise that Adam normalises).
        # 1e-6 is 1/1000 of one AdamW step (lr 1e-3): a wrongly resharded moment or step
        # count moves weights by ~lr.
        assert_close(b["second"][k], a["second"][k], rtol=0, atol=1e-6, msg=k)

def test_probe_finds_a_truncated_or_missing_shard(tmp_path):
    """`usable_checkpoint`'s probe: the DCP index names each shard file and the byte range in
    it; a shorter or missing file is refused without reading a tensor."""
    import torch.distributed.checkpoint as dcp

    from hapo_cli.learner.dcp_checkpoint import DCP_DIR, probe_dcp
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    tok = build_tokenizer()
    model = build_tiny_model(TinyModelConfig(), tok)
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / DCP_DIR), no_dist=True)
    probe_dcp(tmp_path)  # intact
    shard = tmp_path / DCP_DIR / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated"):
        probe_dcp(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        probe_dcp(tmp_path)
    (tmp_path / DCP_DIR / ".metadata").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        probe_dcp(tmp_path)


@pytest.mark.parametrize("copy_state", [False, True])
def test_async_save_writes_the_save_step_while_training_goes_on(tmp_path, copy_state):
    """An asynchronous save returns at once; the next optimizer step waits until the save no
    longer reads the live tensors: the write itself (copy_state=False, no copy made) or DCP's
    staging copy (True). Here that work is held back until the next step has run (or 1 s has
    passed): without the wait the step would change the weights and Adam moments first and
    the checkpoint would hold the later state."""
    import threading
    from concurrent.futures import Future
    from types import SimpleNamespace

    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from hapo_cli.learner.dcp_checkpoint import (
        Checkpointer,
        LiveState,
        load_train_state,
        train_state,
    )

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 8))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt) -> None:
        model(torch.randn(16, 32)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flat(model, opt) -> dict[str, torch.Tensor]:
        st = train_state(model, opt)
        out = {f"model.{k}": v.detach().clone() for k, v in st["model"].items()}
        for name, s in st["optim"]["state"].items():
            out.update({f"optim.{name}.{k}": v.detach().clone() for k, v in s.items()})
        return out

    model, opt = build(0)
    step(model, opt)
    at_save = flat(model, opt)
    stepped = threading.Event()
    opt.register_step_post_hook(lambda *_: stepped.set())

    class HeldCopy(DefaultStager):  # DCP's own stager, starting its copy late
        def _stage(self, state_dict, **kwargs):
            stepped.wait(timeout=1.0)
            return super()._stage(state_dict, **kwargs)

    class HeldLive(LiveState):  # no copy; the writer starts late
        def stage(self, state_dict, **kwargs):
            fut: Future = Future()
            threading.Thread(target=lambda: (stepped.wait(timeout=1.0),
                                             fut.set_result(state_dict))).start()
            return fut

    def held():
        return HeldCopy(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                       use_async_staging=True, use_non_blocking_copy=False)
                        ) if copy_state else HeldLive()

    one_process = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    saver = Checkpointer(tmp_path, one_process, keep=2, copy_state=copy_state, stager=held)
    saver.save(1, model, opt, lambda folder: None)
    opt.register_step_pre_hook(lambda *_: None)  # another pre-hook, after the saver's
    step(model, opt)  # waits for the copy or the write, then changes every tensor
    saver.wait()
    step(model, opt)  # nothing in flight: the hook lets it through
    after = flat(model, opt)
    assert all(not torch.equal(after[k], at_save[k]) for k in at_save)

    fresh, fresh_opt = build(1)
    load_train_state(tmp_path / "checkpoints" / "step-000001", fresh, fresh_opt)
    loaded = flat(fresh, fresh_opt)
    assert loaded.keys() == at_save.keys()
    for k in at_save:
        assert torch.equal(loaded[k], at_save[k]), k


def test_zero_partitions_elsewhere_are_one_line_naming_the_conversion(tmp_path):
    """A ZeRO checkpoint met by FSDP2, DDP or one process: one line naming DeepSpeed with the
    world size that wrote it, and the new-run command that test_dcp_e2e.py runs (for a DCP
    checkpoint's export) with this checkpoint's own folder as the model."""
    from hapo_cli.learner import zero_state

    ckpt = tmp_path / "run" / "checkpoints" / "step-000007"
    msg = str(zero_state.not_resumable_here(ckpt, 4))
    assert "\n" not in msg and msg.startswith(f"{ckpt}: holds DeepSpeed ZeRO")
    assert "--num_processes 4" in msg
    assert msg.endswith(f"hapo train --recipe {tmp_path / 'run' / 'recipe.yaml'} --set "
                        f"model.init=pretrained --set model.path={ckpt} --set model.tiny=null "
                        "--set model.warmup=null --output NEW_RUN")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_init_adam_state_is_the_state_a_first_step_builds(cls, amsgrad, default_dtype, fused):
    """`init_adam_state` restates torch's Adam `_init_group` (and its private step dtype rule):
    the same keys, dtypes, devices and shapes as the state a real first step creates, all zero
    (the step count included). Fails if a torch release changes what Adam keeps."""
    from hapo_cli.learner.dcp_checkpoint import init_adam_state

    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        def fresh():
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 2)  # default-dtype parameters
            model.bias.requires_grad_(False)  # a frozen parameter gets no state either way
            return model, cls(model.parameters(), lr=1e-3, amsgrad=amsgrad, fused=fused)

        model, opt = fresh()
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        opt.step()
        stepped = {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}

        model, opt = fresh()
        assert init_adam_state(opt)
        assert not init_adam_state(opt)  # it has state now: left alone
        ours = {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}
    finally:
        torch.set_default_dtype(previous)
    assert ours.keys() == stepped.keys() == {"weight"}
    for n in ours:
        assert ours[n].keys() == stepped[n].keys(), n
        for k, t in ours[n].items():
            ref = stepped[n][k]
            assert (t.dtype, t.device, t.shape) == (ref.dtype, ref.device, ref.shape), (n, k)
            assert not t.any(), (n, k)  # step 0, zero moments
