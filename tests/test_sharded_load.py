"""Sharded start-up under FSDP2 (hapo_cli/learner/sharded_load.py): each rank reads only its
slices of the safetensors; the shards equal a full load's, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import failure_report

ROOT = Path(__file__).resolve().parent.parent


def _tiny_dir(tmp: Path, dtype: torch.dtype) -> Path:
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(), tok).to(dtype)
    out = tmp / f"policy-{str(dtype).removeprefix('torch.')}"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def run_two_ranks(worker: str, out: Path, model_dirs: list[str], timeout: int) -> None:
    """torchrun 2 ranks of tests/`worker` OUT MODEL_DIR ...; fails the test with its report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / worker), str(out), *model_dirs],
        env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, failure_report(res)


def test_sharded_start_up_equals_full_load(tmp_path):
    """2 FSDP2 ranks: every local shard (fp32 masters, also from a bf16 file: the same cast)
    and every buffer equal those of `from_pretrained` + `fully_shard`, bit for bit; the tied
    LM head stays tied."""
    dtypes = [torch.float32, torch.bfloat16]
    model_dirs = [str(_tiny_dir(tmp_path, dtype)) for dtype in dtypes]
    out = tmp_path / "shards"
    run_two_ranks("sharded_load_worker.py", out, model_dirs, timeout=300)
    for i, rank in ((i, r) for i in range(len(dtypes)) for r in range(2)):
        got = torch.load(f"{out}.{i}.{rank}.pt", weights_only=True)
        assert got["tied"] and got["dtensor"]
        assert got["sharded"].keys() == got["full"].keys()
        for k, v in got["full"].items():
            assert v.dtype == torch.float32 or k.startswith("buffer."), k
            assert got["sharded"][k].dtype == v.dtype and torch.equal(got["sharded"][k], v), k
