"""MetricSums (learner/reduce.py) against the per-micro-batch Python-float loop it replaces."""

from __future__ import annotations

import torch

from analysis import schema
from hapo_cli.algo import policy_loss
from hapo_cli.algo.loss import ADDITIVE
from hapo_cli.learner.reduce import MetricSums


def _python_loop(micro_metrics, masks):
    """The learner's former reduction: float() of every metric of every micro-batch."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for m, mk in zip(micro_metrics, masks):
        n_valid = float(m.get(schema.VALID_TOKENS, mk.sum()))
        for k, v in m.items():
            v = float(v)
            if k == schema.PG_LOSS or k in ADDITIVE:
                sums[k] = sums.get(k, 0.0) + v
            else:
                sums[k] = sums.get(k, 0.0) + v * n_valid
                weights[k] = weights.get(k, 0.0) + n_valid
    return sums, weights


def test_metric_sums_equal_the_python_loop_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    metrics, masks = [], []
    for _ in range(5):  # five micro-batches of policy_loss metrics, one fully masked
        B, T = 6, 9
        mask = torch.rand(B, T, generator=g) > 0.3
        if not metrics:
            mask[:] = False
        logp = -torch.rand(B, T, generator=g) * 3
        old = logp + 0.3 * torch.randn(B, T, generator=g)
        adv = torch.randn(B, T, generator=g)
        h = torch.rand(B, T, generator=g) * 2 - 1
        _, m = policy_loss(logp, old, adv, mask, 0.2, 0.28, normalizer=torch.tensor(40.0), h=h,
                           adv_before=adv * 0.9)
        metrics.append(m)
        masks.append(mask)
    acc = MetricSums()
    for m, mk in zip(metrics, masks):
        acc.add(m, mk)
    got = acc.totals()
    want = _python_loop(metrics, masks)
    assert got == want  # same float64 arithmetic in the same order: exact
    assert list(got[0]) == list(want[0])


def test_metric_sums_without_valid_tokens_use_the_mask_and_empty_is_empty():
    assert MetricSums().totals() == ({}, {})
    acc = MetricSums()
    mask = torch.tensor([[True, False, True]])
    r, a = schema.RATIO_MEAN, schema.ADV_C_POS_TOKEN_SUM
    acc.add({r: torch.tensor(0.5), a: torch.tensor(1.5)}, mask)
    acc.add({r: torch.tensor(1.0), a: torch.tensor(2.0)}, mask)
    # ratio_mean: 0.5*2 + 1.0*2 = 3 over weight 4; sums just add
    assert acc.totals() == ({r: 3.0, a: 3.5}, {r: 4.0})


def _entropy_stats_with_floats(entropy, mask, pivot, mode, eps=1e-8):
    """entropy_stats as it read each number with float() (one host sync each)."""
    from hapo_cli.algo.entropy import quantile_1d, stats_from_reduced, valid_log_entropy

    x = valid_log_entropy(entropy, mask, eps)
    rho = quantile_1d(x, pivot, mode)
    ssd = float(((x - rho) ** 2).sum())
    return stats_from_reduced(x.numel(), rho, ssd, float(x.min()), float(x.max()), mode, eps)


def test_entropy_stats_read_once_equal_the_float_per_value_version():
    from hapo_cli.algo import entropy_stats

    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        B, T = torch.randint(1, 9, (2,), generator=g).tolist()
        ent = torch.rand(B, T, generator=g) ** 3 * 2
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[0, 0] = True
        for mode in ("paper", "released"):
            for pivot in (0.0, 0.37, 0.8, 1.0):
                # float64 both ways, same operations: equal, not just close
                assert entropy_stats(ent, mask, pivot, mode) == _entropy_stats_with_floats(
                    ent, mask, pivot, mode)
