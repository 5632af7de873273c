"""Real `hapo ablate` on the tiny recipe: two variants x one seed, SIGKILLed mid-run (the whole
process group: the ablation and its training process), then the same command completes with
no run repeated from scratch and nothing lost (metrics steps contiguous, no duplicates)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 6

pytestmark = pytest.mark.slow


def _command(out: Path, cache: Path) -> list[str]:
    sets = [
        f"train.max_steps={MAX_STEPS}", "eval.every=2", "eval.limit=8", "eval.n=2",
        "log.checkpoint_every=2", "log.token_sample_every=0", f"model.cache_dir={cache}",
        "model.warmup.steps=40", "rollout.n=4", "rollout.max_new_tokens=12",
        "train.prompts_per_step=4", "train.mini_batch_prompts=4",
        "train.dynamic_sampling.max_num_gen_batches=1", "train.overlong.buffer_len=4",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "hapo_cli.cli", "ablate", "--recipe", "tiny/hapo",
           "--variants", "none,ABCD", "--seeds", "1", "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines]


def _last_val(run_dir: Path, key: str) -> tuple[float, float]:
    vals = [json.loads(x).get(key) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v is not None]
    return vals[-1], max(vals)


def test_tiny_ablation_killed_and_resumed(tmp_path):
    out, cache = tmp_path / "abl", tmp_path / "cache"
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.time()
    parent = subprocess.Popen(_command(out, cache), cwd=tmp_path, env=env,
                              start_new_session=True,  # own process group: kill it whole
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = out / "none-s1"
    killed_at = None
    while time.time() - t0 < 240 and parent.poll() is None:
        ckpts = sorted((first / "checkpoints").glob("step-*")) if first.is_dir() else []
        manifest = first / "manifest.json"
        step = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
        if 0 < step < MAX_STEPS and json.loads(manifest.read_text())["status"] == "running":
            killed_at = step
            os.killpg(parent.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    parent.wait(timeout=30)
    log1 = parent.stdout.read().decode()
    assert killed_at is not None and killed_at < MAX_STEPS, log1
    spec = json.loads((out / "ablation.json").read_text())
    assert spec["runs"]["none-s1"]["status"] == "running"  # killed: nobody updated it

    res = subprocess.run(_command(out, cache), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resume from step {killed_at} none-s1" in res.stdout, res.stdout
    wall = time.time() - t0
    print(f"tiny 2-variant ablation incl. kill + resume: {wall:.0f} s")

    spec = json.loads((out / "ablation.json").read_text())
    assert [p["run_dir"] for p in spec["plan"]] == ["none-s1", "ABCD-s1"]
    assert {k: v["status"] for k, v in spec["runs"].items()} == {"none-s1": "done",
                                                                  "ABCD-s1": "done"}
    assert spec["runs"]["none-s1"]["attempts"] == 2 and spec["runs"]["ABCD-s1"]["attempts"] == 1
    for run in ("none-s1", "ABCD-s1"):
        # step 0 = validation before training; then every step once, in order
        assert _steps(out / run) == list(range(MAX_STEPS + 1)), run
        manifest = json.loads((out / run / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["final_step"] == MAX_STEPS
    resumed = json.loads((out / "none-s1" / "manifest.json").read_text())
    assert len(resumed["resumed_at"]) == 1  # continued once, not restarted
    # both variants started from the one shared warm-up policy
    policies = {json.loads((out / r / "manifest.json").read_text())["policy_path"]
                for r in ("none-s1", "ABCD-s1")}
    assert len(policies) == 1 and len(list(cache.glob("warmup-*/warmup.json"))) == 1

    # the summary table: values recomputed here from the metrics
    df = pd.read_csv(out / "summary.csv", index_col="variant")
    assert list(df.index) == ["none", "ABCD"]
    key = "val/arith/avg@2"
    base_final, base_best = _last_val(out / "none-s1", key)
    full_final, full_best = _last_val(out / "ABCD-s1", key)
    assert df.at["none", "arith/avg@2/final_mean"] == pytest.approx(base_final)
    assert df.at["ABCD", "arith/avg@2/best_mean"] == pytest.approx(full_best)
    assert df.at["ABCD", "arith/avg@2/delta_final"] == pytest.approx(full_final - base_final)
    assert math.isnan(df.at["ABCD", "arith/avg@2/final_std"])  # one seed: no std
    assert "ablation abl" in res.stdout and f"{full_final - base_final:+.3f}" in res.stdout
    assert (out / "summary.md").read_text().count("| ABCD |") == 1
