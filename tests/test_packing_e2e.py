"""`hapo train --recipe tiny/steps_hapo` (responses of 4 to ~25 tokens: the direct and the worked
style) with `train.packing=true` and a token budget of micro-batches gives, over 6 steps, the
metrics of the padded count-micro-batch run, on one process and under DDP (2 processes, where
the ranks' micro-batch counts differ and must not deadlock).

Tolerance: the packed forward sums in other orders (float32, ~1e-6 relative on one step's
log-probs and gradients); over 6 steps the weights drift apart by that much per step, and the
sampled tokens stay the same (Gumbel-max with near-ties far above 1e-6), so metrics agree to
rel 1e-3 (abs 1e-5 for values near 0). A leak across sequences or a lost micro-batch moves the
loss and gradient norm by far more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import failure_report, read_metrics
from test_strategy_e2e import ROOT, _launch

STEPS = 6
SETS = ["model.warmup.steps=150", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
        "train.micro_batch_size=8", "rollout.n=4", "eval.every=0", "eval.at_start=false",
        "train.dynamic_sampling.enabled=false", "log.token_sample_every=0",
        "log.checkpoint_every=0", "data.max_prompt_length=16"]
PACKED = ["train.packing=true", "train.max_tokens_per_micro_batch=48"]  # 16 + 32 new tokens


def _train(out: Path, cache: Path, strategy: str, extra: list[str]) -> None:
    args = ["-m", "hapo_cli.cli", "train", "--recipe", "tiny/steps_hapo", "--max-steps",
            str(STEPS), "--output", str(out)]
    for s in [*SETS, f"model.cache_dir={cache}", *extra]:
        args += ["--set", s]
    cmd = [sys.executable, *args] if strategy == "single" else [*_launch(strategy), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, f"{strategy} {extra}\n" + failure_report(res)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing-e2e")
    cache = root / "cache"
    _train(root / "warm", cache, "single", ["train.max_steps=0"])  # one process builds the cache
    out = {}
    for strategy in ("single", "ddp"):
        for name, extra in (("padded", []), ("packed", PACKED)):
            out[f"{strategy}-{name}"] = root / f"{strategy}-{name}"
            _train(out[f"{strategy}-{name}"], cache, strategy, extra)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_packed_budgeted_run_equals_the_padded_run(runs, strategy):
    a = read_metrics(runs[f"{strategy}-padded"])
    b = read_metrics(runs[f"{strategy}-packed"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert all(r["rollout/response_len_mean"] > 3 for r in a)
    compared = 0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k, va in ra.items():
            if k.startswith("time/") or not isinstance(va, (int, float)):
                continue
            assert rb[k] == pytest.approx(va, rel=1e-3, abs=1e-5), (ra["step"], k, va, rb[k])
            compared += 1
    assert compared > STEPS * 30
    m = json.loads((runs[f"{strategy}-packed"] / "manifest.json").read_text())
    assert m["status"] == "done"
