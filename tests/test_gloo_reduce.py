"""The gradient reduce-scatter in slices on gloo (hapo_cli/learner/gloo_reduce.py): at 2 ranks
it gives the unsliced collective's result bit for bit (each element is still a + b), through
the plain function, DeepSpeed's `reduce_scatter_coalesced` (ZeRO-3's gradient path) and FSDP2's
custom reduce-scatter hook, while no call hands gloo more than one slice. The memory it saves is
measured in bench/bench_strategy.py, not here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import failure_report
from gloo_reduce_worker import DONE

WORKER = Path(__file__).with_name("gloo_reduce_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo_reduce")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(WORKER), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, failure_report(res, DONE)
    return [torch.load(out / f"results-{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("case", ["plain-24-12", "plain-23-10", "plain-7-100"])
def test_slices_equal_one_reduce_scatter(ranks, case):
    """n=24 in slices of 6 per rank, n=23 in 5+5+5+5+3 (a remainder), n=7 in one slice; the
    output as a separate tensor and as this rank's part of the input (DeepSpeed's call)."""
    n, slice_numel = (int(v) for v in case.split("-")[1:])
    k = max(1, min(n, slice_numel // 2))
    for r in ranks:
        got = r[case]
        assert torch.equal(got["sliced"], got["whole"])
        assert torch.equal(got["aliased"], got["whole"])
        assert max(got["sizes"]) <= 2 * k
        assert len(got["sizes"]) == 2 * -(-n // k)  # both runs, ceil(n / k) slices each
    # the two ranks got different halves of one sum, not their own inputs back
    assert not torch.equal(ranks[0][case]["whole"], ranks[1][case]["whole"])


@pytest.mark.parametrize("case", ["deepspeed-one", "deepspeed-padded"])
def test_deepspeed_reduce_scatter_coalesced_in_slices(ranks, case):
    """ZeRO-3's `reduce_scatter_coalesced`, wrapped twice (idempotent): every call DeepSpeed's
    own function got held at most 8 elements, and the partitions equal the unsliced ones."""
    for r in ranks:
        got = r[case]
        assert len(got["sliced"]) == len(got["whole"])
        for s, w in zip(got["sliced"], got["whole"], strict=True):
            assert torch.equal(s, w)
        assert len(got["sizes"]) > 1 and max(got["sizes"]) <= 8


def test_fsdp2_sliced_reduce_scatter_gives_the_same_gradients(ranks):
    for r in ranks:
        whole, sliced = r["fsdp2"]["whole"], r["fsdp2"]["sliced"]
        assert r["fsdp2"]["calls"] == 1  # the root's one reduce-scatter went through the hook
        assert len(whole) == 4
        for s, w in zip(sliced, whole, strict=True):
            assert torch.equal(s, w)
