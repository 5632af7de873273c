"""analysis.stats: t critical values, mean CIs and paired differences, worked by hand; and
invariants of the pairing (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.stats import mean_ci, pair_by_seed, paired_difference, t_critical, t_two_sided_p


def p_dof4(t: float) -> float:
    """Two-sided p of Student t with 4 dof in closed form: the CDF is
    1/2 + t (t^2 + 6) / (2 (t^2 + 4)^(3/2)), so P(|T| >= t) = 1 - t (t^2 + 6) / (t^2 + 4)^1.5."""
    t = abs(t)
    return 1 - t * (t * t + 6) / (t * t + 4) ** 1.5


def p_dof3(t: float) -> float:
    """Two-sided p with 3 dof: P(|T| >= t) = 1 - (2/pi) (atan(u) + u / (1 + u^2)), u = t/sqrt 3."""
    u = abs(t) / math.sqrt(3)
    return 1 - 2 / math.pi * (math.atan(u) + u / (1 + u * u))


def test_t_critical_table_values():
    # printed t tables, two-sided 95 %: dof 1 12.706, 3 3.182, 4 2.776, 9 2.262, 30 2.042
    for dof, table in ((1, 12.706), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_critical(dof) == pytest.approx(table, abs=5e-4)
    assert t_two_sided_p(t_critical(4), 4) == pytest.approx(0.05, abs=1e-10)


def test_t_two_sided_p_matches_closed_forms():
    for t in (0.0, 0.5, 1.0, 2.0, 4.89898, 15.8):
        assert t_two_sided_p(t, 4) == pytest.approx(p_dof4(t), abs=1e-12)
        assert t_two_sided_p(-t, 3) == pytest.approx(p_dof3(t), abs=1e-12)
    assert t_two_sided_p(math.inf, 4) == 0.0 and math.isnan(t_two_sided_p(math.nan, 4))


# Five seeds worked by hand (seeds 1..5):
#   variant v = 0.30 0.34 0.32 0.36 0.28   baseline b = 0.25 0.30 0.26 0.31 0.23
V = {1: 0.30, 2: 0.34, 3: 0.32, 4: 0.36, 5: 0.28}
B = {1: 0.25, 2: 0.30, 3: 0.26, 4: 0.31, 5: 0.23}


def test_mean_ci_five_seeds_by_hand():
    # mean 1.60 / 5 = 0.32; deviations -.02 .02 0 .04 -.04, squares sum 0.0040, s^2 = 0.001,
    # s = 0.0316228, se = s / sqrt 5 = sqrt(0.0002) = 0.0141421; t(4) = 2.776:
    # half width 2.776 * 0.0141421 = 0.039259 -> [0.280741, 0.359259]
    ci = mean_ci(V.values())
    assert ci.n == 5 and ci.mean == pytest.approx(0.32)
    assert ci.std == pytest.approx(0.0316228, abs=1e-7)
    assert ci.low == pytest.approx(0.32 - 2.776 * 0.0141421, abs=1e-5)
    assert ci.high == pytest.approx(0.32 + 2.776 * 0.0141421, abs=1e-5)


def test_mean_ci_one_and_no_value():
    one = mean_ci([0.4, float("nan")])  # NaN is not a value
    assert one.n == 1 and one.mean == 0.4
    assert math.isnan(one.std) and math.isnan(one.low) and math.isnan(one.high)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)


def test_paired_difference_five_seeds_by_hand():
    # d = v - b = .05 .04 .06 .05 .05: mean 0.05; deviations 0 -.01 .01 0 0, squares 0.0002,
    # s^2 = 0.00005, se = sqrt(0.00005 / 5) = sqrt(1e-5) = 0.00316228;
    # CI 0.05 -+ 2.776 * 0.00316228 = 0.05 -+ 0.008778 -> [0.041222, 0.058778];
    # t = 0.05 / 0.00316228 = 15.8114 (t^2 = 250): p = 1 - t (256) / 254^1.5 = 9.349e-5
    d = paired_difference(V, B)
    assert d.n == 5 and d.delta == pytest.approx(0.05)
    assert d.low == pytest.approx(0.05 - 2.776 * 0.00316228, abs=1e-5)
    assert d.high == pytest.approx(0.05 + 2.776 * 0.00316228, abs=1e-5)
    assert d.p == pytest.approx(p_dof4(math.sqrt(250)), rel=1e-6)
    assert d.p == pytest.approx(9.349e-5, rel=1e-3)
    assert d.significant is True


def test_paired_difference_not_significant_by_hand():
    # d = .02 -.01 .03 -.02 .00: mean 0.004; squares of deviations .000256 .000196 .000676
    # .000576 .000016 -> 0.00172, s^2 = 0.00043, se = sqrt(0.00043 / 5) = 0.0092736,
    # t = 0.004 / 0.0092736 = 0.43133 -> p = 0.688 with 4 dof; the CI
    # 0.004 -+ 2.776 * 0.0092736 = [-0.02174, 0.02974] includes 0
    v = {s: B[s] + d for s, d in zip(B, (0.02, -0.01, 0.03, -0.02, 0.0), strict=True)}
    d = paired_difference(v, B)
    assert d.delta == pytest.approx(0.004)
    assert d.p == pytest.approx(p_dof4(0.004 / 0.0092736), abs=1e-4)
    assert d.p == pytest.approx(0.688, abs=1e-3)
    assert d.low == pytest.approx(0.004 - 2.776 * 0.0092736, abs=1e-4) and d.low < 0 < d.high
    assert d.significant is False


def test_paired_difference_missing_seeds_left_out():
    # seed 3 missing on the baseline side, seed 6 only on the variant's, seed 2 NaN: 3 pairs
    # (1, 4, 5): d = .05 .05 .05 -> delta .05, sd 0, so CI [.05, .05] and p = 0 (up to rounding)
    v = {**V, 6: 0.5}
    b = {s: x for s, x in B.items() if s != 3} | {2: float("nan")}
    assert [s for s, _, _ in pair_by_seed(v, b)] == [1, 4, 5]
    d = paired_difference(v, b)
    assert d.n == 3 and d.delta == pytest.approx(0.05)
    assert d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)
    assert d.p < 1e-20 and d.significant is True  # sd 0 up to rounding: p ~ 0
    one = paired_difference({1: 0.3}, B)
    assert one.n == 1 and one.delta == pytest.approx(0.05) and one.significant is None
    assert math.isnan(one.low) and math.isnan(one.p)
    assert paired_difference({9: 0.3}, B).n == 0
    same = paired_difference(B, B)
    assert same.delta == 0.0 and same.p == 1.0 and same.significant is False


# ---------------------------------------------------------------- invariants

values = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)
seed_values = st.dictionaries(st.integers(0, 50), values, min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(values, min_size=1, max_size=12))
def test_ci_contains_the_mean(xs):
    ci = mean_ci(xs)
    assert ci.n == len(xs)
    if ci.n >= 2:
        tol = 1e-12 * (1 + abs(ci.mean))
        assert ci.low - tol <= ci.mean <= ci.high + tol
        assert ci.high - ci.mean == pytest.approx(ci.mean - ci.low, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed_values, st.data())
def test_pairing_is_invariant_under_seed_order(v, data):
    b = {s: x / 2 + 0.1 for s, x in v.items()}
    b = {s: b[s] + data.draw(values) for s in data.draw(st.permutations(list(b)))}
    shuffled_v = {s: v[s] for s in data.draw(st.permutations(list(v)))}
    assert paired_difference(shuffled_v, b) == paired_difference(v, b)


@settings(max_examples=60, deadline=None)
@given(seed_values, seed_values, st.floats(min_value=-0.5, max_value=0.5, allow_nan=False))
def test_constant_on_the_baseline_shifts_delta_by_that_constant(v, b, c):
    before = paired_difference(v, b)
    after = paired_difference(v, {s: x + c for s, x in b.items()})
    assert after.n == before.n == len(set(v) & set(b))
    if before.n == 0:
        return
    # Δ = mean(v - b): b + c gives Δ - c; the interval moves with it, its width unchanged
    # (sd of the differences unchanged; p changes, since Δ does)
    assert after.delta == pytest.approx(before.delta - c, abs=1e-12)
    if before.n >= 2:
        assert after.low == pytest.approx(before.low - c, abs=1e-9)
        assert after.high == pytest.approx(before.high - c, abs=1e-9)
        assert after.high - after.low == pytest.approx(before.high - before.low, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(seed_values, seed_values)
def test_significant_iff_the_interval_excludes_zero(v, b):
    d = paired_difference(v, b)
    if d.significant is None:
        assert d.n < 2
        return
    assert 0.0 <= d.p <= 1.0
    margin = 1e-9 * (1 + abs(d.delta))
    if d.low > margin or d.high < -margin:
        assert d.significant
    elif d.low < -margin and d.high > margin:
        assert not d.significant
