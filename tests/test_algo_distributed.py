"""Distributed entropy stats: simulated shards, histogram error bound, a real 2-process gloo run."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from hapo_cli.algo import EntropyStats, distributed_entropy_stats, entropy_stats, stats_from_shards
from hapo_cli.algo.distributed import quantile_from_histogram, shard_histogram
from hapo_cli.algo.entropy import valid_log_entropy


def _batch(seed, b=12, t=30):
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(b, t, generator=gen) ** 3 * 4  # skewed, like token entropies
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return entropy, mask


def _assert_stats_close(a: EntropyStats, b: EntropyStats, **tol):
    assert a.mode == b.mode and a.num_tokens == b.num_tokens
    got = torch.tensor([a.rho, a.std, a.scale_pos, a.scale_neg], dtype=torch.float64)
    exp = torch.tensor([b.rho, b.std, b.scale_pos, b.scale_neg], dtype=torch.float64)
    assert_close(got, exp, **tol)


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("splits", [[12], [5, 7], [3, 0, 9], [1, 1, 10]])
def test_shards_exact_equal_whole_batch(mode, splits):
    entropy, mask = _batch(0)
    xs = [valid_log_entropy(e, m) for e, m in zip(entropy.split(splits), mask.split(splits), strict=True)]
    stats, info = stats_from_shards(xs, 0.8, mode)
    assert info == {"exact": True, "quantile_bin_error": 0.0, "num_tokens": int(mask.sum())}
    _assert_stats_close(stats, entropy_stats(entropy, mask, 0.8, mode))


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_histogram_path_error_is_bounded_by_bin_width(mode):
    entropy, mask = _batch(1, b=64, t=64)
    xs = [valid_log_entropy(e, m) for e, m in zip(entropy.split(20), mask.split(20), strict=True)]
    exact = entropy_stats(entropy, mask, 0.8, mode)
    stats, info = stats_from_shards(xs, 0.8, mode, exact_max_tokens=10, num_bins=512)
    x = torch.cat(xs)
    width = float(x.max() - x.min()) / 512
    assert not info["exact"] and info["quantile_bin_error"] == pytest.approx(width)
    assert abs(stats.rho - exact.rho) <= width
    # std, scales move only through rho: within a small multiple of the bin width
    assert abs(stats.std - exact.std) <= 2 * width


def test_quantile_from_histogram_hand_values():
    # values 0, 1, 2, 3 in 3 bins of width 1 over [0, 3] (3 goes in the last bin):
    # bins [0,1): {0}, [1,2): {1}, [2,3]: {2, 3}
    x = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    hist = shard_histogram(x, 0.0, 3.0, 3)
    assert hist.tolist() == [1.0, 1.0, 2.0]
    # nearest rank of q = 0.5: round(1.5) = 2 -> the first of 2 values in bin [2, 3]:
    # estimate 2 + 1 * (0 + 0.5) / 2 = 2.25 (true value 2, error 0.25 <= width 1)
    est, err = quantile_from_histogram(hist, 0.0, 3.0, 0.5, "released")
    assert (est, err) == (2.25, 1.0)
    # linear q = 0.5: ranks 1 (bin [1,2): 1.5) and 2 (2.25) -> 1.5 + 0.5 * 0.75 = 1.875 (true 1.5)
    est, _ = quantile_from_histogram(hist, 0.0, 3.0, 0.5, "paper")
    assert est == pytest.approx(1.875)
    # all equal values: zero-width range -> exact
    assert quantile_from_histogram(shard_histogram(torch.ones(5), 1.0, 1.0, 8), 1.0, 1.0, 0.8, "paper") == (1.0, 0.0)


def test_empty_shards():
    stats, info = stats_from_shards([torch.zeros(0, dtype=torch.float64)] * 2)
    assert stats.num_tokens == 0 and info["exact"]
    assert stats == entropy_stats(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool))


def test_not_initialised_equals_entropy_stats():
    assert not dist.is_initialized()
    entropy, mask = _batch(2)
    for mode in ("paper", "released"):
        stats, info = distributed_entropy_stats(entropy, mask, 0.8, mode)
        assert stats == entropy_stats(entropy, mask, 0.8, mode)
        assert info["exact"] and info["quantile_bin_error"] == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, splits, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        entropy, mask = _batch(3)
        e, m = entropy.split(splits)[rank], mask.split(splits)[rank]
        out = {}
        for mode in ("paper", "released"):
            out[mode] = distributed_entropy_stats(e, m, 0.8, mode)[0].to_dict()
            out[mode + "-hist"] = distributed_entropy_stats(e, m, 0.8, mode, exact_max_tokens=1,
                                                            num_bins=256)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process():
    world, splits = 2, [5, 7]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), splits, results), nprocs=world,
                       join=True, start_method="spawn")
    entropy, mask = _batch(3)
    for mode in ("paper", "released"):
        expected = entropy_stats(entropy, mask, 0.8, mode)
        for rank in range(world):
            _assert_stats_close(EntropyStats.from_dict(results[rank][mode]), expected)
            hist_stats, info = results[rank][mode + "-hist"]
            assert not info["exact"] and abs(hist_stats.rho - expected.rho) <= info["quantile_bin_error"]
        assert results[0][mode] == results[1][mode]  # every rank gets the same stats
    assert math.isfinite(expected.rho)
