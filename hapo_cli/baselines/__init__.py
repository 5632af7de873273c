"""Baselines: what HAPO's letters (A-D) are added to, chosen by `algo.baseline`.

A baseline owns its objective: the per-token advantages, the token selection (which tokens
the loss counts, and which the token-mean divides by), the loss and its aggregation, and its
published defaults (recipe values filled in when a recipe leaves them out). The learner asks
the object; it never compares a baseline's name.

Adding one: a module in this package with a `Baseline` subclass decorated with
`@register_baseline("name")` (see `base.py` and docs/extending/baselines.md). Modules are found by
listing the package; they import torch only inside their methods, so loading a recipe (which
reads a baseline's defaults) stays free of torch.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

DEFAULT = "dapo"
REGISTRY: dict[str, type] = {}
_found = False


def register_baseline(name: str):
    """Class decorator: register a `Baseline` subclass as `algo.baseline=name`."""
    def deco(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise RuntimeError(f"baseline {name!r} registered twice: {REGISTRY[name]} and {cls}")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def _discover() -> None:
    global _found
    if not _found:
        for info in pkgutil.iter_modules(__path__):
            import_module(f"{__name__}.{info.name}")
        _found = True


def baseline_names() -> tuple[str, ...]:
    """The registered names, the default (dapo) first, then alphabetically."""
    _discover()
    return tuple(sorted(REGISTRY, key=lambda n: (n != DEFAULT, n)))


def baseline_class(name: str) -> type:
    """The class registered as `name` (ValueError naming the choices if none)."""
    _discover()
    if name not in REGISTRY:
        raise ValueError(f"algo.baseline={name!r} is not one of: {', '.join(baseline_names())}")
    return REGISTRY[name]


def get_baseline(name: str):
    """An instance of the baseline registered as `name`."""
    return baseline_class(name)()


def baseline_sections() -> dict:
    """The recipe's `algo.<section>` fields: {section: (its Config, Field)} of each baseline
    with settings of its own (`Baseline.Config`, defaults as published)."""
    from pydantic import Field

    out = {}
    for name in baseline_names():
        bl = REGISTRY[name]
        if bl.Config is not None:
            out[bl.section()] = (bl.Config, Field(
                default_factory=bl.Config,
                description=f"{name}'s own settings ({bl.source}); read only when "
                f"algo.baseline={name}."))
    return out


def read_renamed(algo):
    """The recipe's algo section with the old keys of baselines' settings (`Baseline.renamed`,
    e.g. algo.forking_quantile -> algo.forking.quantile) moved into their sections, so older
    recipes and run directories' recipe.yaml still load; both forms with different values is
    an error. Anything not a dict is returned as is (its own validation reports it)."""
    if not isinstance(algo, dict):
        return algo
    out = dict(algo)
    for name in baseline_names():
        bl = REGISTRY[name]
        for old, new in bl.renamed.items():
            if old not in out:
                continue
            sec = bl.section()
            sub = out.get(sec) or {}
            if not isinstance(sub, dict):
                return algo
            sub, value = dict(sub), out.pop(old)
            if new in sub and sub[new] != value:
                raise ValueError(f"algo.{old}={value!r} and algo.{sec}.{new}={sub[new]!r}: the "
                                 f"same setting twice; keep algo.{sec}.{new}")
            sub[new] = value
            out[sec] = sub
    return out


__all__ = ["REGISTRY", "baseline_class", "baseline_names", "baseline_sections", "get_baseline",
           "read_renamed", "register_baseline"]
