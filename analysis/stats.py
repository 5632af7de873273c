"""Seed statistics of an ablation: a mean with its Student-t confidence interval, and the
paired difference of a variant to the baseline over the seeds both have (paired t-test).

Every seed of every variant starts from the same warm-up policy and sees the same prompts, so
the seed is the pairing unit: ``d_s = v_s - b_s`` over the common seeds ``s``, then
``mean(d) ± t_{n-1} · sd(d) / sqrt(n)`` and ``p = P(|T_{n-1}| >= |mean(d)| / (sd(d) / sqrt(n)))``.
The t distribution comes from its regularized incomplete beta function (mpmath, already
installed with sympy): ``P(|T_ν| >= t) = I_{ν / (ν + t²)}(ν / 2, 1 / 2)``.

Pure functions of floats; no pandas, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

LEVEL = 0.95  # confidence level of every interval; significance is p < 1 - LEVEL


def t_two_sided_p(t: float, dof: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``dof`` degrees of freedom (exact: incomplete
    beta). ``t = ±inf`` gives 0; NaN gives NaN."""
    if dof < 1:
        raise ValueError(f"t distribution needs dof >= 1, got {dof}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    import mpmath

    x = dof / (dof + t * t)
    return min(1.0, max(0.0, float(mpmath.betainc(dof / 2, 0.5, 0, x, regularized=True))))


@lru_cache(maxsize=256)
def t_critical(dof: int, level: float = LEVEL) -> float:
    """The two-sided critical value ``t`` with ``P(|T_dof| >= t) = 1 - level`` (e.g. 2.776
    for dof 4 at 95 %), by bisection on ``t_two_sided_p`` to ~1e-12."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    alpha = 1.0 - level
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, dof) > alpha:  # p falls with t: bracket the root
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, dof) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _finite(values: Iterable[float]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if not math.isnan(f):
            out.append(f)
    return out


@dataclass(frozen=True)
class MeanCI:
    """Mean of ``n`` values with its sample std (n - 1) and Student-t confidence interval;
    ``low``/``high`` (and ``std``) are NaN when ``n < 2``, everything NaN when ``n = 0``."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def mean_ci(values: Iterable[float], level: float = LEVEL) -> MeanCI:
    """``mean ± t_{n-1, level} · s / sqrt(n)`` of the non-NaN ``values``."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical(n - 1, level) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedDiff:
    """Paired difference variant - baseline over ``n`` common seeds: mean ``delta``, its
    confidence interval and the paired t-test's two-sided ``p`` (NaN when ``n < 2``)."""

    n: int
    delta: float
    low: float
    high: float
    p: float
    level: float = LEVEL

    @property
    def significant(self) -> bool | None:
        """True when p < 1 - level (the interval excludes 0); None when it cannot be said
        (fewer than two pairs)."""
        if self.n < 2 or math.isnan(self.p):
            return None
        return self.p < 1.0 - self.level


K = TypeVar("K", bound=Hashable)  # a seed key (an int in the summaries)


def pair_by_seed(
    variant: Mapping[K, float], baseline: Mapping[K, float]
) -> list[tuple[K, float, float]]:
    """``(seed, v, b)`` for the seeds with a (non-NaN) value on both sides, sorted by seed;
    a seed missing or NaN on either side is left out."""
    v = {s: float(x) for s, x in variant.items() if x is not None and not math.isnan(float(x))}
    b = {s: float(x) for s, x in baseline.items() if x is not None and not math.isnan(float(x))}
    common = sorted(set(v) & set(b), key=lambda s: (str(type(s)), s))
    return [(s, v[s], b[s]) for s in common]


def paired_difference(
    variant: Mapping[K, float], baseline: Mapping[K, float],
    level: float = LEVEL,
) -> PairedDiff:
    """Paired t over the seeds both sides have: ``d_s = variant[s] - baseline[s]``,
    ``delta = mean(d)``, interval ``delta ± t_{n-1} · sd(d) / sqrt(n)``, ``p`` two-sided.

    All differences equal (sd 0): the interval is ``[delta, delta]`` and p is 0 (or 1 when
    delta is 0). One pair: delta only; no pair: all NaN.
    """
    pairs = pair_by_seed(variant, baseline)
    d = [v - b for _, v, b in pairs]
    n = len(d)
    if n == 0:
        return PairedDiff(0, math.nan, math.nan, math.nan, math.nan, level)
    ci = mean_ci(d, level)
    if n == 1:
        return PairedDiff(1, ci.mean, math.nan, math.nan, math.nan, level)
    se = ci.std / math.sqrt(n)
    if se == 0.0:
        p = 1.0 if ci.mean == 0.0 else 0.0
    else:
        p = t_two_sided_p(ci.mean / se, n - 1)
    return PairedDiff(n, ci.mean, ci.low, ci.high, p, level)


__all__ = ["LEVEL", "MeanCI", "PairedDiff", "mean_ci", "pair_by_seed", "paired_difference",
           "t_critical", "t_two_sided_p"]
