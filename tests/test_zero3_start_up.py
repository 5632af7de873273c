"""DeepSpeed ZeRO-3 start-up (hapo_cli/learner/sharded_load.py `load_policy_zero3`): each rank
fills only its partitions from the safetensors, and they equal `from_pretrained` inside
`zero.Init` bit for bit; the fp32 masters shared with the partitions
(zero_memory.py `share_fp32_masters`) train exactly as DeepSpeed's own second copy does."""

from __future__ import annotations

import pytest
import torch
from test_sharded_load import _tiny_dir, run_two_ranks


@pytest.mark.slow
def test_zero3_start_up_equals_zero_init_load_and_shared_masters_train_the_same(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is in the dev extras: pip install -e '.[dev]'")
    dtypes = [torch.float32, torch.bfloat16]
    model_dirs = [str(_tiny_dir(tmp_path, dtype)) for dtype in dtypes]
    out = tmp_path / "parts"
    run_two_ranks("zero3_start_up_worker.py", out, model_dirs, timeout=450)
    for i in range(len(dtypes)):
        numel = 0
        for rank in range(2):
            got = torch.load(f"{out}.{i}.{rank}.pt", weights_only=True)
            assert got["tied"]
            assert got["sharded"].keys() == got["full"].keys()
            for k, v in got["full"].items():
                assert v.dtype == torch.float32 or k.startswith("buffer."), k
                assert got["sharded"][k].dtype == v.dtype and torch.equal(got["sharded"][k], v), k
            numel += sum(v.numel() for k, v in got["sharded"].items() if k.startswith("param."))
        assert numel == got["numel"]  # the two ranks' partitions cover every element once
    for rank in range(2):
        runs = torch.load(f"{out}.steps.{rank}.pt", weights_only=True)
        shared, copied = runs[True], runs[False]
        assert all(shared["shared"]) and not any(copied["shared"])
        assert shared["partitions"].keys() == copied["partitions"].keys()
        for k, v in copied["partitions"].items():
            assert torch.equal(shared["partitions"][k], v), k
        first = torch.load(f"{out}.0.{rank}.pt", weights_only=True)["sharded"]
        assert any(not torch.equal(first[k], v) for k, v in copied["partitions"].items()
                   if k.startswith("param."))  # the steps moved the weights
        assert len(shared["moments"]) == len(copied["moments"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(shared["moments"], copied["moments"]))
