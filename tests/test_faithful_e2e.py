"""Issue #14 through `hapo train` on the tiny model: the trainer steps the verl warm-up once per
training step from lr 0, and DAPO's dynamic sampling stops the run when the batch cannot fill."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

runner = CliRunner()

SMALL = [
    "model.warmup.steps=150", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
    "train.micro_batch_size=8", "rollout.n=4", "eval.limit=8", "eval.n=2", "eval.every=0",
    "log.token_sample_every=0", "log.checkpoint_every=0", "train.dynamic_sampling.enabled=false",
]


def sets(cache_dir, *extra: str) -> list[str]:
    return [x for s in [*SMALL, f"model.cache_dir={cache_dir}", *extra] for x in ("--set", s)]


def read_metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_verl_warmup_steps_once_per_training_step(tmp_path, cache_dir):
    out = tmp_path / "run"
    # 4 prompts / mini-batch 2 = 2 optimizer steps per training step; warm-up over 4 training steps
    res = runner.invoke(app, ["train", "--recipe", "tiny/dapo", "--max-steps", "3", "--output",
                              str(out), *sets(cache_dir, "train.lr=1e-4", "train.warmup_steps=4",
                                              "train.warmup_unit=training",
                                              "train.warmup_start=zero")])
    assert res.exit_code == 0, res.output
    rows = [r for r in read_metrics(out) if r["step"] > 0]
    # lr of training step k (1-based) = 1e-4 * (k - 1)/4: 0, 2.5e-5, 5e-5
    assert [r["actor/lr"] for r in rows] == pytest.approx([0.0, 2.5e-5, 5e-5])
    assert [r["actor/optimizer_steps"] for r in rows] == [2.0, 2.0, 2.0]
    assert [r["actor/skipped_steps"] for r in rows] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_dapo_dynamic_sampling_raises_when_exhausted(tmp_path, cache_dir):
    out = tmp_path / "run"
    # one generation batch of 4 prompts x 4 responses must give 4 mixed groups, or the step
    # raises. At ~30 % accuracy a group is mixed with p = 1 - 0.3^4 - 0.7^4 = 0.75, all 4 with
    # p = 0.32, so 4 steps without a partial batch have p = 0.01 (and the seed is fixed).
    res = runner.invoke(app, ["train", "--recipe", "tiny/dapo", "--max-steps", "4", "--output",
                              str(out), *sets(cache_dir, "train.dynamic_sampling.enabled=true",
                                              "train.dynamic_sampling.max_num_gen_batches=1",
                                              "train.dynamic_sampling.on_exhausted=raise",
                                              "train.dynamic_sampling.refill=same")])
    manifest = json.loads((out / schema.MANIFEST).read_text())
    rows = read_metrics(out)
    errors = [r for r in rows if "error" in r]
    if not errors:  # every group of every step happened to be mixed: nothing to raise
        assert manifest["status"] == "done"
        assert all(r.get("rollout/fill_rate", 1.0) == 1.0 for r in rows)
        pytest.fail("the warm-up policy filled every batch; the test needs a partial batch")
    assert manifest["status"] == "failed", res.output
    assert "dynamic sampling kept" in errors[0]["error"]
