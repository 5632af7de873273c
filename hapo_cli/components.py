"""HAPO's component letters <-> recipe switches: the one place that maps them.

A adaptive temperature, B token-level group average, C differential advantage redistribution,
D asymmetric adaptive clipping. No letters ('none') = the baseline named by `algo.baseline`.
"""

from __future__ import annotations

import json

from .errors import RecipeError

SWITCHES: dict[str, str] = {
    "A": "adaptive_temperature",
    "B": "token_level_advantage",
    "C": "redistribute",
    "D": "adaptive_clip",
}
NAMES: dict[str, str] = {
    "A": "adaptive temperature sampling",
    "B": "token-level group average",
    "C": "differential advantage redistribution",
    "D": "asymmetric adaptive clipping",
}
LETTERS = "ABCD"


def parse_components(spec: str) -> str:
    """'abd' / 'A,B,D' / 'none' -> canonical 'ABD' or 'none'. An empty string is an error, not
    the baseline: `--components "$UNSET"` must not train something nobody chose."""
    s = spec.strip().upper().replace(",", "").replace(" ", "")
    if not s:
        raise RecipeError(
            f"--components {spec!r}: empty; use letters of ABCD (e.g. ABCD) or 'none' for the "
            "baseline"
        )
    if s in ("NONE", "-"):
        return "none"
    bad = sorted(set(s) - set(LETTERS))
    if bad:
        raise RecipeError(
            f"--components '{spec}': unknown letter(s) {''.join(bad)}; use any of ABCD or 'none'"
        )
    if len(set(s)) != len(s):
        raise RecipeError(f"--components '{spec}': a letter is repeated")
    return "".join(c for c in LETTERS if c in s)


def apply_components(data: dict, spec: str) -> dict:
    """Set the four switches of a recipe dict from a letter string (others switched off)."""
    letters = parse_components(spec)
    out = json.loads(json.dumps(data))
    algo = out.setdefault("algo", {})
    if not isinstance(algo, dict):
        raise RecipeError("recipe error: 'algo' must be a section")
    for letter, field in SWITCHES.items():
        algo[field] = letter in letters
    return out


def letters_of(algo) -> str:
    """AlgoConfig -> 'ABCD' subset or 'none'."""
    s = "".join(letter for letter, field in SWITCHES.items() if getattr(algo, field))
    return s or "none"
