"""Run directories -> pandas -> figures, tables and a report. Never imports torch or hapo_cli.

``import analysis.schema`` stays cheap (standard library only): the heavier entry points are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy exports' types, for the type checker only
    from analysis.io import load_paths, load_run
    from analysis.report import analyze
    from analysis.summary import ablation_summary, write_summary

__all__ = ["ablation_summary", "write_summary", "analyze", "load_run", "load_paths"]

_LAZY = {
    "ablation_summary": "analysis.summary",
    "write_summary": "analysis.summary",
    "analyze": "analysis.report",
    "load_run": "analysis.io",
    "load_paths": "analysis.io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
