"""Every precision the README names, through the real CLI with the HF engine: `hapo train` with
`model.dtype=bfloat16` or `train.mixed_precision=bf16` on one process, DDP (2 processes) and
FSDP2 (2 processes), each followed by `hapo evaluate` on the run; float16 without CUDA is refused
before anything is written (issue 23 item 1: bf16 on one process crashed in the fast decode step,
and no test sampled with the HF engine under bf16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import failure_report, read_metrics, strip_times
from test_strategy_e2e import ROOT, SETS, _launch

from analysis import schema

STEPS = 2
PRECISIONS = {"dtype": "model.dtype=bfloat16", "mp": "train.mixed_precision=bf16"}
# Both spellings on one process (where they must be the same run, bit for bit), and each on one
# of the 2-process strategies: they resolve to one `Precision` before any strategy sees them
# (learner/precision.py), so a spelling x strategy product would run the same code twice.
RUNS = [("single", "dtype"), ("single", "mp"), ("ddp", "dtype"), ("fsdp", "mp")]


def _train(out: Path, cache: Path, strategy: str, precision: str) -> subprocess.CompletedProcess:
    args = ["-m", "hapo_cli.cli", "train", "--recipe", "tiny/hapo", "--max-steps", str(STEPS),
            "--output", str(out)]
    for s in [*SETS, f"model.cache_dir={cache}", "eval.every=0", precision]:
        args += ["--set", s]
    cmd = [sys.executable, *args] if strategy == "single" else [*_launch(strategy), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, warm_cache) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for strategy, name in RUNS:
        run = root / f"{strategy}-{name}"
        res = _train(run, warm_cache, strategy, PRECISIONS[name])
        assert res.returncode == 0, f"{strategy} {name}\n" + failure_report(res)
        out[(strategy, name)] = run
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,name", RUNS)
def test_bf16_trains_and_evaluates(runs, strategy, name, tmp_path):
    run = runs[(strategy, name)]
    m = json.loads((run / schema.MANIFEST).read_text())
    assert m["status"] == "done"
    assert m["strategy"] == {"single": "single", "ddp": "ddp", "fsdp": "fsdp2"}[strategy]
    # fp32 masters and Adam state, bf16 compute, whichever of the two fields asked for it
    assert (m["compute_dtype"], m["master_dtype"], m["optimizer_state_dtype"]) == \
        ("bfloat16", "float32", "float32")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # 0: validation at start
    rows = rows[1:]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert v == v and abs(v) != float("inf"), (k, v)
        # the engine samples under the learner's bf16 compute: the learner's recomputed
        # log-probs stay close to the behaviour ones (fp32 gives ~4e-7; bf16 rounding of
        # unit-scale logits is ~4e-3 relative, so 0.05 nats bounds a working path and
        # catches a sampler computing something else)
        assert r["actor/behaviour_logp_gap"] < 0.05, r["actor/behaviour_logp_gap"]
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", "evaluate", str(run), "--bench",
                          "arith", "--n", "2", "--limit", "8", "--temperature", "1.0,adaptive",
                          "--name", "bf16"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    evals = [json.loads(x) for x in (run / "eval" / "bf16.jsonl").read_text().splitlines()
             if x.strip()]
    assert len(evals) == 2
    for e in evals:
        accs = [v for k, v in e.items() if k.endswith("avg@2")]
        assert accs and all(0.0 <= a <= 1.0 for a in accs), e


@pytest.mark.slow
def test_the_two_bf16_spellings_are_the_same_run(runs):
    """`model.dtype=bfloat16` and `train.mixed_precision=bf16` both mean fp32 masters computing
    in bf16: the same seed gives the same metrics, bit for bit (times excepted)."""
    a = strip_times(read_metrics(runs[("single", "dtype")]))
    b = strip_times(read_metrics(runs[("single", "mp")]))
    assert a == b


@pytest.mark.parametrize("precision,field", [("model.dtype=float16", "model.dtype=float16"),
                                             ("train.mixed_precision=fp16",
                                              "train.mixed_precision=fp16")])
def test_float16_without_cuda_is_one_line_before_anything_is_written(tmp_path, precision, field):
    if torch.cuda.is_available():
        pytest.skip("float16 runs where CUDA is present")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", "train", "--recipe", "tiny/hapo",
                          "--output", str(out), "--set", precision],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], lines
    assert "CUDA" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()
