"""Reliability (issue 11): nothing a user owns is lost, every bad input is one line + exit 2,
interrupted and failed runs say so in their manifest, resume falls back to a good checkpoint."""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL, read_metrics, sets, strip_times
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

runner = CliRunner()

def train_args(out: Path, cache_dir: Path, steps: int = 2, *extra: str) -> list[str]:
    return ["train", "--recipe", "tiny/hapo", "--max-steps", str(steps), "--output", str(out),
            *sets(cache_dir, *extra)]


def rows(run: Path) -> list[dict]:
    return read_metrics(run)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".hapo.lock"}


def one_error_line(res) -> str:
    """The CLI's message: exactly one line, starting with 'error:' (no traceback)."""
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.output  # (a progress bar may precede it on stdout)
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2, in the HF format (an HF
    folder + optimizer.pt, what runs wrote before DCP): its resumes below write DCP
    checkpoints and must continue exactly (tests/test_dcp_e2e.py has the DCP kinds)."""
    out = tmp_path_factory.mktemp("done") / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 2, "log.checkpoint_every=1",
                                        "log.checkpoint_format=hf"))
    assert res.exit_code == 0, res.output
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".hapo.lock"))
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    d = tmp_path_factory.mktemp("model")
    tok = build_tokenizer()
    build_tiny_model(TinyModelConfig(), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------
# data loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overwrite_removes_only_what_the_run_wrote(tmp_path, cache_dir, done_run):
    run = copy_run(done_run, tmp_path / "run")
    (run / "notes.txt").write_text("my notes")
    (run / "src").mkdir()
    (run / "src" / "a.py").write_text("print(1)")
    old_start = json.loads((run / schema.MANIFEST).read_text())["start_time"]
    res = runner.invoke(app, [*train_args(run, cache_dir, 1), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "src" / "a.py").read_text() == "print(1)"
    assert [r["step"] for r in rows(run)] == [0, 1]
    assert json.loads((run / schema.MANIFEST).read_text())["start_time"] != old_start
    assert [c.name for c in (run / schema.CHECKPOINTS_DIR).iterdir()] == ["step-000001"]


def test_folder_that_is_not_a_run_is_never_overwritten(tmp_path, cache_dir):
    d = tmp_path / "mine"
    (d / "src").mkdir(parents=True)
    (d / schema.METRICS).write_text('{"step": 1, "loss": 0.5}\n')
    (d / "notes.txt").write_text("keep")
    (d / "src" / "x.py").write_text("x = 1")
    before = snapshot(d)
    for flag in ([], ["--overwrite"], ["--resume"]):
        res = runner.invoke(app, [*train_args(d, cache_dir, 1), *flag])
        assert res.exit_code == 2, res.output
        assert "not a hapo run" in one_error_line(res)
        assert snapshot(d) == before


@pytest.mark.slow
def test_overwrite_with_invalid_input_leaves_the_old_run_intact(tmp_path, cache_dir, done_run,
                                                                 model_dir):
    run = copy_run(done_run, tmp_path / "run")
    before = snapshot(run)
    bad_model = tmp_path / "bad-model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{}")
    for extra in (["train.betas=[2,3]"], ["algo.eps_high=5"], ["train.lr=.inf"],
                  ["model.init=pretrained", "model.warmup=null", f"model.path={bad_model}"],
                  ["model.init=pretrained", "model.warmup=null",
                   f"model.path={tmp_path / 'nowhere'}"]):
        res = runner.invoke(app, [*train_args(run, cache_dir, 1, *extra), "--overwrite"])
        assert res.exit_code == 2, (extra, res.output)
        one_error_line(res)
        assert snapshot(run) == before, extra


def test_evaluate_name_cannot_escape_the_eval_folder(tmp_path, done_run):
    run = copy_run(done_run, tmp_path / "run")
    before = snapshot(run)
    for name in ("../metrics", "../../x", "/tmp/x", "a/b", "..", ".hidden", ""):
        res = runner.invoke(app, ["evaluate", str(run), "--bench", "arith", "--name", name])
        assert res.exit_code == 2, (name, res.output)
        assert "--name" in one_error_line(res)
    assert snapshot(run) == before
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_then_resume_has_no_duplicate_step(tmp_path,
                                                                            cache_dir):
    extra = ("log.checkpoint_every=0", "eval.every=0")
    full = tmp_path / "full"
    assert runner.invoke(app, train_args(full, cache_dir, 3, *extra)).exit_code == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hapo_cli.cli", *train_args(killed, cache_dir, 3, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / schema.METRICS).exists() and any(r["step"] >= 1 for r in rows(killed)):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / schema.CHECKPOINTS_DIR).exists()
    assert rows(killed)[0]["step"] == 0
    res = runner.invoke(app, [*train_args(killed, cache_dir, 3, *extra), "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in rows(killed)] == [0, 1, 2, 3]
    assert strip_times(rows(killed)) == strip_times(rows(full))


def _bad_pickle(path: Path) -> None:
    """A torch file that `weights_only=True` refuses (a datetime is not an allowed global)."""
    torch.save({"state": datetime.datetime(2026, 1, 1)}, path)


@pytest.mark.parametrize("corruption", ["state-json", "safetensors", "pickle", "config",
                                        "zero-pickle", "no-tokenizer-json"])
def test_usable_checkpoint_skips_each_kind_of_corrupt_latest(tmp_path, done_run, corruption):
    from hapo_cli.learner.resume import usable_checkpoint

    run = copy_run(done_run, tmp_path / "run")
    latest = run / schema.CHECKPOINTS_DIR / "step-000002"
    if corruption == "state-json":
        (latest / "trainer_state.json").write_text('{"step": 2, "stream"')
    elif corruption == "safetensors":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif corruption == "pickle":
        _bad_pickle(latest / "optimizer.pt")
    elif corruption == "zero-pickle":  # a ZeRO partition file allows DeepSpeed's classes only
        _bad_pickle(latest / "zero-optim-rank00000-of-00001.pt")
    elif corruption == "no-tokenizer-json":  # transformers would build an empty tokenizer
        (latest / "tokenizer.json").unlink()
    else:
        (latest / "config.json").write_text("{}")
    ckpt, skipped = usable_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-000001"
    assert len(skipped) == 1 and skipped[0].startswith("step-000002: ")


@pytest.mark.slow
def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, cache_dir, done_run):
    full = tmp_path / "full"
    assert runner.invoke(app, train_args(full, cache_dir, 3, "log.checkpoint_every=1")
                         ).exit_code == 0
    run = copy_run(done_run, tmp_path / "run")
    _bad_pickle(run / schema.CHECKPOINTS_DIR / "step-000002" / "optimizer.pt")
    res = runner.invoke(app, [*train_args(run, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert "skipping unreadable checkpoint step-000002" in res.output
    assert "continuing from step-000001" in res.output
    manifest = json.loads((run / schema.MANIFEST).read_text())
    assert manifest["status"] == "done" and manifest["resumed_from"] == "step-000001"
    assert strip_times(rows(run)) == strip_times(rows(full))


def test_failing_resume_leaves_a_done_run_untouched(tmp_path, cache_dir, done_run):
    run = copy_run(done_run, tmp_path / "run")
    for ck in (run / schema.CHECKPOINTS_DIR).iterdir():
        _bad_pickle(ck / "optimizer.pt")
    before = snapshot(run)
    res = runner.invoke(app, [*train_args(run, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume"])
    assert res.exit_code == 2, res.output
    assert "no checkpoint loads" in one_error_line(res)
    assert snapshot(run) == before
    assert json.loads((run / schema.MANIFEST).read_text())["status"] == "done"


def test_an_exception_mid_run_ends_the_manifest_failed(tmp_path, cache_dir, monkeypatch):
    from hapo_cli.learner import trainer

    def boom(self, step):
        raise RuntimeError("simulated failure in step")

    monkeypatch.setattr(trainer.Loop, "train_step", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated failure"):
        runner.invoke(app, train_args(out, cache_dir, 2), catch_exceptions=False)
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["status"] == "failed"
    assert manifest["message"] == "RuntimeError: simulated failure in step"
    assert manifest["end_time"] is not None


def test_a_second_writer_is_refused_by_the_lock(tmp_path, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".hapo.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242")
    try:
        res = runner.invoke(app, train_args(out, cache_dir, 1))
    finally:
        os.close(fd)
    assert res.exit_code == 2
    assert "another hapo process (pid 4242)" in one_error_line(res)
    assert sorted(p.name for p in out.iterdir()) == [".hapo.lock"]


@pytest.mark.parametrize("how", ["oserror", "torch-zip-writer"])
def test_disk_full_is_one_line_manifest_failed_no_temporaries(tmp_path, cache_dir, monkeypatch,
                                                              how):
    """Measured on a 20 MB tmpfs: torch.save's zip writer reports a full disk as RuntimeError
    ("unexpected pos ...") rather than ENOSPC; both must end as one line and a failed run."""
    import shutil
    from collections import namedtuple

    from hapo_cli import runlog
    from hapo_cli.learner import checkpoint, loop

    real_save = checkpoint.save_checkpoint
    Usage = namedtuple("Usage", "total used free")

    def full_disk(run_dir, step, *args, **kwargs):
        if step == 2:  # half-way through writing the folder
            tmp = checkpoint.checkpoint_dir(run_dir, step).with_name(".step-000002.tmp")
            tmp.mkdir(parents=True)
            (tmp / "model.safetensors").write_bytes(b"\0" * 100)
            if how == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "optimizer.pt"))
            monkeypatch.setattr(runlog.shutil, "disk_usage", lambda p: Usage(1, 1, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", full_disk)
    out = tmp_path / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 3, "log.checkpoint_every=1",
                                        "log.checkpoint_format=hf"))
    assert res.exit_code == 1, res.output
    line = one_error_line(res)
    assert "no space left on device" in line and "step 2" in line
    assert ("optimizer.pt" if how == "oserror" else str(out)) in line
    monkeypatch.setattr(runlog.shutil, "disk_usage", shutil.disk_usage)
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["status"] == "failed" and "no space left" in manifest["message"]
    assert not list(out.rglob("*.tmp"))
    assert [c.name for c in (out / schema.CHECKPOINTS_DIR).iterdir()] == ["step-000001"]
    # after freeing space, resume continues from the good checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    res = runner.invoke(app, [*train_args(out, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]


def test_read_only_or_file_output_is_one_line(tmp_path, cache_dir, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = runner.invoke(app, train_args(a_file, cache_dir, 1))
    assert res.exit_code == 2 and "is a file" in one_error_line(res)
    res = runner.invoke(app, train_args(a_file / "run", cache_dir, 1))
    assert res.exit_code == 2
    one_error_line(res)
    assert a_file.read_text() == "x"

    ro = tmp_path / "ro"
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    res = runner.invoke(app, train_args(ro, cache_dir, 1))
    assert res.exit_code == 2
    assert "Read-only file system" in one_error_line(res)


# ---------------------------------------------------------------------------------------------
# one red line, exit 2
# ---------------------------------------------------------------------------------------------

BOMB = "".join(
    [f"l0: &l0 [{','.join(['x'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
)


@pytest.mark.parametrize("content, expect", [
    (b"seed: 1\n\xff\xfe\n", "not UTF-8"),
    (b"seed: 1\x00\n", "NUL"),
    (BOMB.encode(), "alias"),
    (b"a: " + b"[" * 100_000 + b"\n", "recipe error"),
])
def test_unreadable_recipes_are_one_line(tmp_path, content, expect):
    p = tmp_path / "r.yaml"
    p.write_bytes(content)
    res = runner.invoke(app, ["recipes", "show", str(p)])
    assert res.exit_code == 2, res.output
    assert expect in one_error_line(res)


@pytest.mark.parametrize("override, expect", [
    ("train..lr=1e-3", "empty segment"),
    ("a..b=1", "empty segment"),
    ("algo.eps_high=5", "algo.eps_high"),
    ("algo.eps_high=.inf", "algo.eps_high"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.betas=[2,3]", "betas"),
    ("data.task=nope", "unknown synthetic task"),
    ("model.tiny.num_heads=3", "num_heads"),
])
def test_bad_overrides_are_load_time_errors(override, expect):
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--set", override])
    assert res.exit_code == 2, res.output
    assert expect in one_error_line(res)


def test_cache_dir_that_is_a_file(tmp_path):
    f = tmp_path / "cache"
    f.write_text("")
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--set", f"model.cache_dir={f}"])
    assert res.exit_code == 2 and "cache_dir" in one_error_line(res)


@pytest.mark.parametrize("option, expect", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "2"], "--top-p"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--n", "0"], "--n"),
    (["--tau", "nan"], "--tau"),
])
def test_evaluate_options_out_of_range(model_dir, tmp_path, option, expect):
    res = runner.invoke(app, ["evaluate", str(model_dir), "--bench", "arith", "--out",
                              str(tmp_path / "o"), *option])
    assert res.exit_code == 2, res.output
    assert expect in one_error_line(res)
    assert not (tmp_path / "o").exists()


def _break_model(d: Path, how: str) -> None:
    if how == "safetensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:100])
    elif how == "config-invalid":
        (d / "config.json").write_text("{not json")
    elif how == "config-empty":
        (d / "config.json").write_text("{}")
    elif how == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).unlink()


@pytest.mark.parametrize("how", ["safetensors", "config-invalid", "config-empty", "no-tokenizer"])
def test_broken_model_folders_are_one_line(tmp_path, model_dir, cache_dir, how):
    import shutil

    d = shutil.copytree(model_dir, tmp_path / "m")
    _break_model(d, how)
    res = runner.invoke(app, ["evaluate", str(d), "--bench", "arith", "--out",
                              str(tmp_path / "o"), "--limit", "2"])
    assert res.exit_code == 2, res.output
    assert str(d) in one_error_line(res)
    out = tmp_path / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 1, "model.init=pretrained",
                                        "model.warmup=null", f"model.path={d}"))
    assert res.exit_code == 2, res.output
    assert str(d) in one_error_line(res)  # the broken folder, not the recipe, is the error
    assert not out.exists()  # no run left marked `running`


def test_evaluate_corrupt_checkpoint_is_one_line(tmp_path, done_run):
    run = copy_run(done_run, tmp_path / "run")
    _break_model(run / schema.CHECKPOINTS_DIR / "step-000002", "safetensors")
    res = runner.invoke(app, ["evaluate", str(run), "--bench", "arith", "--limit", "2"])
    assert res.exit_code == 2, res.output
    assert "step-000002" in one_error_line(res)


@pytest.mark.parametrize("content, expect", [
    (b'{"prompt": "1+1=", "answer": "2"}\n\xff\n', "line 2: not UTF-8"),
    (b'{"prompt": "1+1=\x00", "answer": "2"}\n', "line 1: contains a NUL"),
    (b"[" * 100_000 + b"\n", "line 1: JSON nested too deeply"),
])
def test_bad_benchmark_files_are_one_line(tmp_path, model_dir, content, expect):
    bench = tmp_path / "b.jsonl"
    bench.write_bytes(content)
    res = runner.invoke(app, ["evaluate", str(model_dir), "--bench", str(bench), "--out",
                              str(tmp_path / "o"), "--n", "1"])
    assert res.exit_code == 2, res.output
    assert expect in one_error_line(res)


def test_ablation_json_holding_a_list(tmp_path):
    (tmp_path / schema.ABLATION).write_text("[1, 2]")
    res = runner.invoke(app, ["ablate", "--summary", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "ablation.json" in one_error_line(res)


def test_analyze_out_that_is_a_file(tmp_path, done_run):
    f = tmp_path / "out"
    f.write_text("keep")
    res = runner.invoke(app, ["analyze", str(done_run), "--out", str(f)])
    assert res.exit_code == 2, res.output
    assert "is a file" in one_error_line(res)
    assert f.read_text() == "keep"


# ---------------------------------------------------------------------------------------------
# interrupts
# ---------------------------------------------------------------------------------------------


def test_a_second_signal_cannot_cut_the_clean_up_short():
    """Ctrl-C reaches a whole process group and an ablation then also terminates its children:
    the first signal interrupts, a second one during the clean-up is ignored, and leaving the
    block restores the previous handlers."""
    from hapo_cli.interrupts import interrupt_once

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cleaned = False
    with interrupt_once():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal interrupts this
            raise AssertionError("SIGINT did not interrupt")
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # would end the process unhandled
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            cleaned = True
    assert cleaned
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
@pytest.mark.parametrize("sigs", [(signal.SIGINT,), (signal.SIGTERM,),
                                  (signal.SIGINT, signal.SIGTERM)], ids=["int", "term", "both"])
def test_ctrl_c_and_sigterm_mark_the_run_interrupted(tmp_path, cache_dir, sigs):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hapo_cli.cli", *train_args(out, cache_dir, 200)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / schema.METRICS).exists() and any(r["step"] >= 2 for r in rows(out)):
            break
        time.sleep(0.05)
    for sig in sigs:  # both: a Ctrl-C, then a burst of terminates, none may cut it short
        proc.send_signal(sig)
        for _ in range(20 if sig == signal.SIGTERM and len(sigs) > 1 else 0):
            time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # Ctrl-C stops at once (130); SIGTERM (a preemption) ends after a checkpointed step (75)
    preempted = sigs[0] == signal.SIGTERM
    assert proc.returncode == (75 if preempted else 130), err
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["status"] == "interrupted"
    step = manifest["final_step"]
    assert step >= 2
    how = " (preempted, SIGTERM); checkpoint written" if preempted else ""
    assert f"interrupted at step {step}{how}; continue with --resume" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# reproducibility and verification cost
# ---------------------------------------------------------------------------------------------


def test_warmup_is_independent_of_the_callers_thread_count(tmp_path):
    """`hapo ablate` (torch's default threads) and `hapo train` (train.threads=1) must build the
    same policy under one cache key. 60 steps at 1 vs 2 threads differed before the fix."""
    from hapo_cli.models import warmup_policy
    from hapo_cli.recipe import load_recipe

    digests = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            rec = load_recipe("tiny/hapo", ["model.warmup.steps=60", "model.warmup.target_acc=null",
                                            f"model.cache_dir={tmp_path / str(threads)}"])
            torch.set_num_threads(threads)
            path = warmup_policy(rec.model, rec.data)
            assert torch.get_num_threads() == threads  # restored for the caller
            digests.append(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]


def test_a_hostile_ground_truth_is_parsed_once_per_answer(monkeypatch):
    """G responses to one prompt share one ground-truth parse; a parse that timed out is not
    retried, so one hostile row costs one timeout, not G."""
    import importlib

    v = importlib.import_module("hapo_cli.rewards.verify")

    calls = {"gold": 0}
    real = v._math_verify_module()

    class Slow:
        LatexExtractionConfig = real.LatexExtractionConfig
        ExprExtractionConfig = real.ExprExtractionConfig

        @staticmethod
        def parse(text, *args, **kwargs):
            if "HOSTILE" in text:
                calls["gold"] += 1
                time.sleep(10)  # interrupted by the 0.2 s alarm
            return real.parse(text, *args, **kwargs)

        verify = staticmethod(real.verify)

    monkeypatch.setattr(v, "_math_verify_module", lambda: Slow)
    monkeypatch.setattr(v, "_GOLD_CACHE", {})
    results = [v.verify_math(f"\\boxed{{{i}}}", "HOSTILE", timeout=0.2) for i in range(8)]
    assert results == [False] * 8
    assert calls["gold"] == 1
    # a normal answer is parsed once for all of its responses too
    assert [v.verify_math(r, "12") for r in ("\\boxed{12}", "\\boxed{13}", "12")] == [
        True, False, True]
    assert list(v._GOLD_CACHE).count("12") == 1


@pytest.mark.slow
def test_ctrl_c_on_ablate_says_how_to_continue(tmp_path, warm_cache):
    """Ctrl-C in a terminal signals the whole foreground process group: the ablation and its
    training process. The ablation says one line and exits 130; its run is `interrupted`."""
    out, cache = tmp_path / "abl", warm_cache
    cmd = [sys.executable, "-m", "hapo_cli.cli", "ablate", "--recipe", "tiny/hapo",
           "--variants", "none", "--seeds", "1", "--output", str(out), "--max-steps", "200"]
    for s in [*SMALL, f"model.cache_dir={cache}"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    run = out / "none-s1"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / schema.METRICS).exists() and any(r["step"] >= 1 for r in rows(run)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; run the same command again to continue" in err
    assert "Traceback" not in err
    spec = json.loads((out / schema.ABLATION).read_text())
    assert json.dumps(spec).count('"interrupted"') >= 1
    assert json.loads((run / schema.MANIFEST).read_text())["status"] == "interrupted"
