"""DCP checkpoints through the CLI (one process, tiny/hapo): the run's checkpoints are DCP
shards with an atomic rename, `hapo export` writes a save_pretrained folder whose logits equal
the trained model's, `hapo evaluate --step` reads the shards, a corrupt DCP checkpoint is
skipped, a full disk during an asynchronous save is one line, and a kill -9 mid async save
leaves the previous checkpoint the newest, from which --resume reproduces the run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, strip_times
from test_reliability import copy_run, one_error_line, train_args
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

runner = CliRunner()
STEPS = 3


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory, cache_dir) -> Path:
    """3 steps, a DCP checkpoint (async, the default) after each, all kept."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    res = runner.invoke(app, train_args(out, cache_dir, STEPS, "log.checkpoint_every=1",
                                        "log.keep_checkpoints=5"))
    assert res.exit_code == 0, res.output
    return out


def _logits(folder: Path, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    ids = torch.arange(2, 14).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_checkpoints_are_dcp_shards_and_the_end_is_exported(dcp_run):
    ckpts = sorted(p.name for p in (dcp_run / schema.CHECKPOINTS_DIR).iterdir())
    assert ckpts == [f"step-{s:06d}" for s in range(1, STEPS + 1)]  # no .tmp left
    last = dcp_run / schema.CHECKPOINTS_DIR / ckpts[-1]
    assert sorted(p.name for p in (last / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    assert not list(last.glob("*.safetensors")) and not (last / "optimizer.pt").exists()
    assert json.loads((last / "trainer_state.json").read_text())["format"] == "dcp"
    assert sorted(p.name for p in (dcp_run / "exports").iterdir()) == [f"step-{STEPS:06d}"]


def test_export_logits_equal_the_trained_models(dcp_run, tmp_path):
    """exports/step-3 was written by the run from its live fp32 weights; `hapo export --step
    3` rebuilds the model from the DCP shards alone: the same logits, bit for bit."""
    out = tmp_path / "m"
    res = runner.invoke(app, ["export", str(dcp_run), "--step", str(STEPS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    trained = _logits(dcp_run / "exports" / f"step-{STEPS:06d}")
    assert torch.equal(_logits(out), trained)
    bf = tmp_path / "bf"
    res = runner.invoke(app, ["export", str(dcp_run), "--dtype", "bfloat16", "--out", str(bf)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((bf / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # bf16 weights: 8 mantissa bits, relative rounding 2^-9 per weight through two layers
    torch.testing.assert_close(_logits(bf, torch.bfloat16), trained, rtol=0.05, atol=0.05)
    res = runner.invoke(app, ["export", str(dcp_run), "--step", "9", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--step 9: no checkpoint of that step" in one_error_line(res)


def test_evaluate_step_reads_the_shards(dcp_run, tmp_path):
    run = copy_run(dcp_run, tmp_path / "run")
    res = runner.invoke(app, ["evaluate", str(run), "--step", "2", "--bench", "arith", "--n", "1",
                              "--limit", "4"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "eval" / "eval.jsonl").read_text().splitlines()]
    assert {r["checkpoint_step"] for r in rows} == {2}


@pytest.mark.parametrize("corruption", ["shard", "metadata", "state-json", "config"])
def test_usable_checkpoint_skips_a_corrupt_dcp_checkpoint(dcp_run, tmp_path, corruption):
    from hapo_cli.learner.resume import usable_checkpoint

    run = copy_run(dcp_run, tmp_path / "run")
    latest = run / schema.CHECKPOINTS_DIR / f"step-{STEPS:06d}"
    if corruption == "shard":
        shard = latest / "dcp" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    elif corruption == "metadata":
        (latest / "dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    elif corruption == "state-json":
        (latest / "trainer_state.json").write_text('{"step": 3, "stream"')
    else:
        (latest / "config.json").write_text("{}")
    ckpt, skipped = usable_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step-{STEPS - 1:06d}"
    assert len(skipped) == 1 and skipped[0].startswith(f"step-{STEPS:06d}: ")


@pytest.mark.slow
def test_deepspeed_refusal_names_commands_that_convert(dcp_run, tmp_path, cache_dir):
    """Under DeepSpeed ZeRO a DCP checkpoint is one line naming the conversion: its commands,
    run as written, start a new run from the checkpoint's weights (checked with a learning rate
    so small that one step leaves them: AdamW moves a weight by ~lr = 1e-30, far under fp32
    rounding of the logits)."""
    import re
    import shlex
    from types import SimpleNamespace

    from hapo_cli.errors import HapoError
    from hapo_cli.learner.dcp_checkpoint import load_into_strategy

    ckpt = dcp_run / schema.CHECKPOINTS_DIR / f"step-{STEPS:06d}"
    with pytest.raises(HapoError) as err:
        load_into_strategy(ckpt, SimpleNamespace(kind="deepspeed"))
    msg = str(err.value)
    assert "\n" not in msg
    export, train = re.search(r"(hapo export .*), then (hapo train .*)$", msg).groups()
    folder, new = tmp_path / "weights", tmp_path / "new"
    res = runner.invoke(app, shlex.split(export.replace("DIR", str(folder)))[1:])
    assert res.exit_code == 0, res.output
    train = train.replace("DIR", str(folder)).replace("NEW_RUN", str(new))
    res = runner.invoke(app, [*shlex.split(train)[1:], "--max-steps", "1", "--set",
                              "train.lr=1e-30"])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(_logits(new / "exports" / "step-000001"), _logits(folder))


@pytest.mark.slow
def test_disk_full_in_an_async_save_is_one_line_then_resume(tmp_path, cache_dir, monkeypatch,
                                                            dcp_run):
    """The write fails in DCP's thread; the next save (or the end) reports it as the run's
    one line, the half-written folder is removed, the previous checkpoint resumes."""
    from torch.distributed.checkpoint import filesystem

    real = filesystem.FileSystemWriter.write_data

    def full(self, plan, planner):
        if "step-000002" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", full)
    out = tmp_path / "run"
    extra = ("log.checkpoint_every=1", "log.keep_checkpoints=5")
    res = runner.invoke(app, train_args(out, cache_dir, STEPS, *extra))
    assert res.exit_code == 1, res.output
    assert "no space left on device" in one_error_line(res).lower()
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["status"] == "failed"
    assert not list(out.rglob("*.tmp"))
    assert [c.name for c in (out / schema.CHECKPOINTS_DIR).iterdir()] == ["step-000001"]
    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", real)
    res = runner.invoke(app, [*train_args(out, cache_dir, STEPS, *extra), "--resume"])
    assert res.exit_code == 0, res.output
    assert strip_times(read_metrics(out)) == strip_times(read_metrics(dcp_run))


# The CLI with step 2's shard write held back (as a slow disk would): the kill lands while the
# asynchronous save of step 2 is in flight and step 3 trains (up to its optimizer step, which
# waits for that write).
SLOW_WRITER = """
import sys, time
from torch.distributed.checkpoint import filesystem
real = filesystem.FileSystemWriter.write_data
def slow(self, plan, planner):
    if "step-000002" in str(self.path):
        time.sleep(600)
    return real(self, plan, planner)
filesystem.FileSystemWriter.write_data = slow
from hapo_cli.cli import main
sys.argv = ["hapo", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(tmp_path, cache_dir,
                                                                    dcp_run):
    extra = ("log.checkpoint_every=1", "log.keep_checkpoints=5")
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER,
                             *train_args(run, cache_dir, STEPS, *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = run / schema.CHECKPOINTS_DIR
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / ".step-000002.tmp" / "trainer_state.json").exists() and \
                (ckpts / "step-000001").exists():
            break
        time.sleep(0.05)
    time.sleep(1.0)  # the write of step 2 is held; training goes on
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-000002.tmp", "step-000001"]
    from hapo_cli.learner.resume import usable_checkpoint

    assert usable_checkpoint(run)[0].name == "step-000001"
    res = runner.invoke(app, [*train_args(run, cache_dir, STEPS, *extra), "--resume"])
    assert res.exit_code == 0, res.output
    assert "continuing" not in res.output  # nothing was skipped: the .tmp never counted
    assert strip_times(read_metrics(run)) == strip_times(read_metrics(dcp_run))
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:06d}" for s in (1, 2, 3)]
