"""Baselines: what HAPO's letters (A-D) are added to, chosen by `algo.baseline`.

A baseline is one object (`base.Baseline`) with three parts: the per-token advantages, the
token selection (which tokens the loss counts, and which the token-mean divides by), and the
loss aggregation. The learner calls only these; it never branches on a baseline's name.

Adding one (say GSPO): a file here with a `Baseline` subclass, and its line in BASELINES
(module:class, imported only when chosen, so loading a recipe stays free of torch).
"""

from __future__ import annotations

from importlib import import_module

BASELINES: dict[str, str] = {
    "dapo": "base:Baseline",
    "grpo": "grpo:Grpo",
    "forking": "forking:Forking",
}


def baseline_names() -> tuple[str, ...]:
    return tuple(BASELINES)


def get_baseline(name: str):
    """The baseline object registered as `name` (ValueError naming the choices if none)."""
    if name not in BASELINES:
        raise ValueError(f"algo.baseline={name!r} is not one of: {', '.join(BASELINES)}")
    module, cls = BASELINES[name].split(":")
    return getattr(import_module(f"{__name__}.{module}"), cls)()


__all__ = ["BASELINES", "baseline_names", "get_baseline"]
