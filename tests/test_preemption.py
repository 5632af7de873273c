"""Preemption-safe `hapo train` (issue 25): SIGTERM (a preemption, `scontrol requeue`, Ray's
`stop_job`) and SIGUSR1/SIGUSR2 (a scheduler's time-limit warning) finish the step the run is
on, write a checkpoint at that step, mark the manifest `interrupted` with the reason and exit
75; `--resume` then reproduces the uninterrupted run's metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_metrics, sets, strip_times
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app
from hapo_cli.interrupts import EXIT_PREEMPTED

runner = CliRunner()
STEPS = 5


def args(cache_dir):
    # checkpoints every 4 steps: the one at the interrupted step (2 or 3) is the preemption's
    return ["--recipe", "tiny/hapo", "--max-steps", str(STEPS),
            *sets(cache_dir, "log.checkpoint_every=4", "eval.every=0")]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("full") / "run"
    res = runner.invoke(app, ["train", *args(cache_dir), "--output", str(out)])
    assert res.exit_code == 0, res.output
    return strip_times(read_metrics(out))


def steps_logged(out) -> int:
    path = out / schema.METRICS
    if not path.exists():
        return 0
    return max((r.get("step", 0) for r in read_metrics(out)), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "preempted"),
                                         (signal.SIGUSR1, "time limit"),
                                         (signal.SIGUSR2, "time limit")],
                         ids=["term", "usr1", "usr2"])
def test_preemption_signal_checkpoints_the_step_and_resume_reproduces(
        tmp_path, cache_dir, full_run, sig, reason):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hapo_cli.cli", "train", *args(cache_dir),
                             "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and steps_logged(out) < 1:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    manifest = json.loads((out / schema.MANIFEST).read_text())
    step = manifest["final_step"]
    assert (manifest["status"], manifest["reason"]) == ("interrupted", reason)
    assert 1 <= step < STEPS
    assert steps_logged(out) == step  # it finished the step it was on, and no other
    ckpts = sorted(p.name for p in (out / schema.CHECKPOINTS_DIR).iterdir())
    assert ckpts[-1] == f"step-{step:06d}"
    assert (f"interrupted at step {step} ({reason}, {sig.name}); checkpoint written; "
            "continue with --resume") in err
    assert "Traceback" not in err

    res = runner.invoke(app, ["train", *args(cache_dir), "--output", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / schema.MANIFEST).read_text())["status"] == "done"
    assert strip_times(read_metrics(out)) == full_run


def test_preemption_signals_are_deferred_only_inside_the_loop():
    """Outside `stop_after_step` a preemption signal raises at once (nothing to checkpoint);
    inside it only records the request; Ctrl-C always raises."""
    import os

    from hapo_cli import interrupts as it

    with it.interrupt_once():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)
    assert it.interrupt_reason() is None  # reset for the next block (a library caller)
    with it.interrupt_once(), it.stop_after_step():
        os.kill(os.getpid(), signal.SIGTERM)
        assert it.stop_requested() == "preempted"
        assert it.exit_code() == EXIT_PREEMPTED
        os.kill(os.getpid(), signal.SIGINT)  # a second signal is ignored while stopping
    with it.interrupt_once(), it.stop_after_step():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert it.stop_requested() is None and it.exit_code() == 130
