"""Grid expansion (pure): `--components`, `--grid` / `--variants`, `--compare-released` and
`--seeds` -> the variants and seeds of an ablation.

A variant name is its canonical component letters ('ABD', or 'none' for the baseline),
optionally with the suffix '-released': the same letters with the released code's entropy
normalisation (`algo.entropy_norm=released`) instead of the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from analysis import schema

from ..components import LETTERS, parse_components
from ..errors import HapoError, RecipeError
from ..sections import MAX_SEED

GRIDS: tuple[str, ...] = ("paper", "single", "leave-one-out", "all")
BASELINE = schema.BASELINE_VARIANT  # "none"
RELEASED_SUFFIX = schema.RELEASED_SUFFIX  # "-released"
RELEASED_OVERRIDE = "algo.entropy_norm=released"

@dataclass(frozen=True)
class Variant:
    """One configuration of the grid: its name, its component letters and extra overrides."""

    name: str
    letters: str  # canonical letters ("ABD") or "none"
    overrides: tuple[str, ...] = ()


def parse_letters(components: str) -> str:
    """`--components`: 'ABCD', 'bd', 'A,C' -> canonical letters; at least one letter."""
    try:
        letters = parse_components(components)
    except RecipeError as exc:
        raise HapoError(str(exc)) from None
    if letters == BASELINE:
        raise HapoError(
            f"--components {components!r}: name at least one of the letters ABCD to ablate"
        )
    return letters


def _order_key(letters: str) -> tuple[int, list[int]]:
    """Baseline first, then by number of letters, then in canonical letter order."""
    if letters == BASELINE:
        return (0, [])
    return (len(letters), [LETTERS.index(c) for c in letters])


def _name(subset: Sequence[str]) -> str:
    return "".join(subset) or BASELINE


def grid_variants(letters: str, grid: str) -> list[str]:
    """The variant names of a grid over `letters` (canonical, e.g. 'ABCD').

    paper: baseline, each letter alone, all but one, all. single: baseline, each letter alone.
    leave-one-out: baseline, all but one, all. all: every subset (2^n variants).
    Sorted baseline first, then by size, then in canonical letter order; no duplicates.
    """
    n = len(letters)
    sizes = {
        "paper": {0, 1, n - 1, n},
        "single": {0, 1},
        "leave-one-out": {0, n - 1, n},
        "all": set(range(n + 1)),
    }
    if grid not in sizes:
        raise HapoError(f"--grid {grid!r} is not one of: {', '.join(GRIDS)}")
    names = {_name(c) for k in sizes[grid] if 0 <= k <= n for c in combinations(letters, k)}
    return sorted(names, key=_order_key)


# entropy_norm changes only what uses the normalised entropy h: A (temperature), C, D.
_ENTROPY_LETTERS = "ACD"


def split_released(name: str) -> tuple[str, bool]:
    """'ABD-released' -> ('ABD', True); 'ABD' -> ('ABD', False)."""
    if name.endswith(RELEASED_SUFFIX):
        return name[: -len(RELEASED_SUFFIX)], True
    return name, False


def variant(name: str) -> Variant:
    """A canonical variant name -> its Variant: letters, and for '-released' the override
    `algo.entropy_norm=released` (applied by the recipe loader with the user's --set)."""
    letters, released = split_released(name)
    return Variant(name, letters, (RELEASED_OVERRIDE,) if released else ())


def _check_released(letters: str, what: str) -> None:
    if not any(c in letters for c in _ENTROPY_LETTERS):
        raise HapoError(
            f"{what}: the released entropy normalisation only changes A, C and D; "
            f"'{letters}{RELEASED_SUFFIX}' would train exactly like '{letters}' (add A, C or D)"
        )


def parse_variants(spec: str, letters: str) -> list[str]:
    """`--variants none,B,AB,ABCD,ABCD-released` -> canonical names in the given order,
    baseline first.

    Every letter must be among `letters` (the `--components`); duplicates are dropped. A
    '-released' suffix selects the released code's entropy normalisation for that variant
    (it needs one of A, C, D, the components that use the normalised entropy).
    """
    items = [s.strip() for s in spec.split(",")]
    if not any(items):
        raise HapoError(
            f"--variants {spec!r}: expected a comma list such as none,B,AB,ABCD,ABCD-released"
        )
    out: list[str] = []
    for raw in items:
        if not raw:
            raise HapoError(f"--variants {spec!r}: empty entry (two commas in a row?)")
        released = raw.lower().endswith(RELEASED_SUFFIX)
        stem = raw[: -len(RELEASED_SUFFIX)] if released else raw
        try:
            name = parse_components(stem) if stem.strip() else None
        except RecipeError:
            name = None
        if name is None:
            raise HapoError(
                f"--variants {spec!r}: {raw!r} is not a variant; use letters of ABCD or 'none', "
                f"optionally with {RELEASED_SUFFIX} (e.g. ABCD{RELEASED_SUFFIX})"
            )
        outside = [c for c in name if name != BASELINE and c not in letters]
        if outside:
            raise HapoError(
                f"--variants {spec!r}: {raw!r} uses {''.join(outside)}, which is not in "
                f"--components {letters}"
            )
        if released:
            _check_released(name, f"--variants {spec!r}")
            name += RELEASED_SUFFIX
        if name not in out:
            out.append(name)
    return sorted(out, key=lambda v: v != BASELINE)  # stable: only moves the baseline first


def expand_variants(
    components: str = "ABCD",
    grid: str = "paper",
    variants: str | None = None,
    compare_released: bool = False,
) -> list[Variant]:
    """`--components`, `--grid` or `--variants`, `--compare-released` -> the variants to run.

    `--compare-released` adds the full method (all of `components`) with the released code's
    entropy normalisation (`algo.entropy_norm=released`), named e.g. 'ABCD-released', unless
    `--variants` already names it; `--variants` can also name any '<letters>-released'.
    """
    letters = parse_letters(components)
    if grid not in GRIDS:  # even when --variants chooses: a typo is never ignored
        raise HapoError(f"--grid {grid!r} is not one of: {', '.join(GRIDS)}")
    names = parse_variants(variants, letters) if variants is not None else grid_variants(
        letters, grid
    )
    if compare_released:
        _check_released(letters, "--compare-released")
        if letters + RELEASED_SUFFIX not in names:
            names.append(letters + RELEASED_SUFFIX)
    return [variant(name) for name in names]


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """`--seeds 1,2,3` -> [1, 2, 3]: integers in 0..MAX_SEED (the recipe's `seed` range),
    duplicates dropped, order kept."""
    if not isinstance(spec, str):
        spec = ",".join(str(s) for s in spec)
    out: list[int] = []
    for raw in spec.split(","):
        raw = raw.strip()
        try:
            seed = int(raw)
        except ValueError:
            raise HapoError(
                f"--seeds {spec!r}: {raw!r} is not an integer; expected e.g. --seeds 1,2,3"
            ) from None
        if not 0 <= seed <= MAX_SEED:
            raise HapoError(f"--seeds {spec!r}: a seed must be in 0..{MAX_SEED}, got {seed}")
        if seed not in out:
            out.append(seed)
    return out



# `--baselines`: each variant on each baseline (the paper's Table 1: HAPO against several
# baselines, paired by seed). Names are '<baseline>-<variant>' ('grpo-none', 'gspo-AB',
# 'dapo-ABCD-released'); the run gets `algo.baseline=<baseline>` and the baseline's published
# settings, except those the user's --set gives.
def parse_baselines(spec: str) -> list[str]:
    """`--baselines dapo,grpo,gspo` -> registered names in the given order, no duplicates."""
    from ..baselines import baseline_names

    known = baseline_names()
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if name not in known:
            raise HapoError(f"--baselines {spec!r}: {name!r} is not a baseline; expected a comma "
                            f"list of: {', '.join(known)}")
        if name not in out:
            out.append(name)
    return out


def cross_baselines(variants: Sequence[Variant], spec: str, user_overrides: Sequence[str] = ()
                    ) -> tuple[list[Variant], list[str]]:
    """(every variant on every baseline of `spec`, one line per combination left out because
    the baseline does not define one of its letters, e.g. C and D on GSPO)."""
    from ..baselines import baseline_class

    user_keys = {item.split("=", 1)[0].strip() for item in user_overrides}
    out: list[Variant] = []
    left_out: list[str] = []
    for name in parse_baselines(spec):
        cls = baseline_class(name)
        published = tuple(f"{k}={_yaml(v)}" for k, v in cls.defaults.items() if k not in user_keys)
        for v in variants:
            refused = [c for c in v.letters if c in cls.refuses]
            if refused and v.letters != BASELINE:
                left_out.append(f"{name}-{v.name}: {cls.refuses[refused[0]]} "
                                f"(component {refused[0]})")
                continue
            out.append(Variant(f"{name}-{v.name}", v.letters,
                               (f"algo.baseline={name}", *published, *v.overrides)))
    if not out:
        raise HapoError(f"--baselines {spec!r}: no variant is defined on these baselines")
    return out, left_out


def _yaml(value) -> str:
    """A recipe value as `--set` writes it (booleans lower case, YAML-parsed back)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
