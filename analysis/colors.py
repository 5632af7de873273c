"""One mapping from a run's label or an ablation's variant to its colour, for every figure.

The variants the recipes and the paper name (the component letters and the algorithm names)
have a fixed colour, so ``ABCD`` is the same orange in every report; other labels take the
first free colour in the order they are first seen. Colours that mean something other than a
variant (the high/low-entropy split, reference lines) are neutral greys, never a variant's.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from matplotlib.colors import to_rgb

# label -> RGB; keyed by the DataFrames' "label" values, which pandas types as any Hashable
Colors = dict[Hashable, Any]

# tab10, then tab20's lighter shades: what labels without a fixed colour are drawn from.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5",
)  # fmt: skip  (tab10's grey #7f7f7f is left out: greys are for reference lines)

# The named variants: the baseline, the full method, each component alone, the algorithms.
FIXED = {
    "none": "#1f77b4", "ABCD": "#ff7f0e", "A": "#2ca02c", "B": "#d62728", "C": "#9467bd",
    "D": "#8c564b", "grpo": "#e377c2", "dapo": "#bcbd22", "forking": "#17becf",
    "hapo": "#ff7f0e",
}  # fmt: skip

HIGH_ENTROPY = "0.15"  # categories that are not variants: neutral greys
LOW_ENTROPY = "0.6"
REFERENCE = "0.45"  # zero lines, ratio = 1


def variant_of(label: str) -> str:
    """The variant a label names: ``"abl-2/AB"`` -> ``"AB"`` (the ablation prefix dropped)."""
    return str(label).rsplit("/", 1)[-1]


def color_map(labels: Iterable[str], taken: Colors | None = None) -> Colors:
    """RGB colour per label: the fixed colour of its variant when free, else the next free one.

    ``taken`` (label -> colour) is kept as it is and its colours are not reused. Build one map
    per report from all labels and pass it to every figure.
    """
    out: Colors = dict(taken or {})
    used = {to_rgb(c) for c in out.values()}
    todo = [lab for lab in dict.fromkeys(labels) if lab not in out]
    for lab in todo:  # fixed colours first, so an unnamed label cannot take one
        fixed = FIXED.get(variant_of(lab)) or FIXED.get(variant_of(lab).lower())
        if fixed is not None and to_rgb(fixed) not in used:
            out[lab] = to_rgb(fixed)
            used.add(out[lab])
    free = [to_rgb(c) for c in PALETTE if to_rgb(c) not in used]
    i = 0
    for lab in todo:
        if lab in out:
            continue
        if i < len(free):
            out[lab] = free[i]
        else:  # more labels than colours: cycle the palette
            out[lab] = to_rgb(PALETTE[i % len(PALETTE)])
        i += 1
    return {lab: out[lab] for lab in [*(taken or {}), *todo]}
