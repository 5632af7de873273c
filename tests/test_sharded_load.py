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


def test_flat_range_reads_the_rows_that_hold_a_flat_range(tmp_path):
    """`_flat_range` (ZeRO-3 start-up): elements [start, stop) of the flattened tensor, by hand
    on a 3 x 4 tensor holding 0..11, a 1-D one and a scalar."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hapo_cli.learner.sharded_load import _flat_range

    f = tmp_path / "t.safetensors"
    save_file({"m": torch.arange(12.0).reshape(3, 4), "v": torch.arange(5.0),
               "s": torch.tensor(7.0)}, str(f))
    with safe_open(f, "pt") as h:
        m, v, s = h.get_slice("m"), h.get_slice("v"), h.get_slice("s")
        assert _flat_range(m, 5, 7).tolist() == [5.0, 6.0]  # inside row 1
        assert _flat_range(m, 3, 9).tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # rows 0-2
        assert _flat_range(m, 0, 6).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 2 ranks: 0
        assert _flat_range(m, 6, 12).tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]  # rank 1
        assert _flat_range(m, 8, 12).tolist() == [8.0, 9.0, 10.0, 11.0]  # a whole last row
        assert _flat_range(v, 3, 5).tolist() == [3.0, 4.0]
        assert _flat_range(s, 0, 1).tolist() == [7.0]
