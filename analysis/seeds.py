"""Which runs are seeds of one recipe: runs that share a label are averaged as seeds only
when their resolved recipes are equal but for the seed (and keys that change nothing) and no
seed repeats; otherwise each gets its own label and a note says why."""

from __future__ import annotations

import json
from typing import Any

Run = Any  # analysis.io.Run (not imported: io imports this module)

# Recipe keys that do not change what a run computes: its seed (what seeds differ in), names,
# where it logs and caches, and its CPU thread count (set per worker by `hapo ablate`).
NOT_THE_RECIPE = ("seed", "train.seed", "name", "log", "model.cache_dir", "train.threads")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe as ``{dotted key: value}`` without ``NOT_THE_RECIPE``: two runs
    are seeds of one recipe when these are equal and their seeds differ."""
    return {k: v for k, v in _flat(recipe).items()
            if not any(k == x or k.startswith(x + ".") for x in NOT_THE_RECIPE)}


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def split_labels(runs: list[Run]) -> list[str]:
    """Give runs that share a label but are not seeds of one recipe their own labels.

    Runs share a label (and are averaged as seeds) only when their resolved recipes are equal
    without ``NOT_THE_RECIPE`` and no seed repeats. Otherwise each recipe gets its own label:
    ``<label> (<key>=<value>)`` for the first key that tells them apart, else
    ``<parent folder>/<label>``, else ``<label> #i``; and a repeated seed of one recipe is not
    another seed: each of those runs is labelled alone. Returns one note per split label."""
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    notes: list[str] = []
    for label, members in by_label.items():
        if len(members) < 2:
            continue
        parts: list[tuple[dict[str, Any], list[Run]]] = []
        for r in members:
            ident = recipe_identity(r.recipe)
            for p_ident, p_runs in parts:
                if p_ident == ident and all(x.seed != r.seed for x in p_runs):
                    p_runs.append(r)
                    break
            else:
                parts.append((ident, [r]))
        if len(parts) == 1:
            continue
        idents = [p[0] for p in parts]
        keys = sorted({k for a in idents for b in idents for k in _differing(a, b)})
        labels = _part_labels(label, parts, keys)
        for (_, p_runs), new in zip(parts, labels, strict=True):
            for r in p_runs:
                r.label = new
        names = " vs ".join(", ".join(r.name for r in p_runs) for _, p_runs in parts)
        if keys:
            shown = "; ".join(f"{k}: " + " vs ".join(_short(i.get(k, "absent")) for i in idents)
                              for k in keys[:2])
            more = f"; {len(keys) - 2} more keys" if len(keys) > 2 else ""
            why = f"their recipes differ ({shown}{more})"
        else:
            seeds = sorted({str(r.seed) for _, p_runs in parts for r in p_runs})
            why = f"the same recipe run twice with seed {', '.join(seeds)} (repeats, not seeds)"
        notes.append(f"label '{label}': {names} kept apart as {', '.join(labels)}: {why}")
    return notes


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 30 else s[:27] + "..."


def _part_labels(label: str, parts: list[tuple[dict[str, Any], list[Run]]],
                 keys: list[str]) -> list[str]:
    for k in keys[:1]:
        out = [f"{label} ({k.rsplit('.', 1)[-1]}={_short(i.get(k, 'absent'))})" for i, _ in parts]
        if len(set(out)) == len(out):
            return out
    parents = [{r.path.parent.name for r in p_runs} for _, p_runs in parts]
    if all(len(p) == 1 for p in parents):
        out = [f"{next(iter(p))}/{label}" for p in parents]
        if len(set(out)) == len(out):
            return out
    return [f"{label} #{i + 1}" for i in range(len(parts))]


__all__ = ["NOT_THE_RECIPE", "recipe_identity", "split_labels"]
