"""DAPO (arXiv 2503.14476): group-normalised advantages, token-mean loss over every valid token,
dynamic sampling, overlong reward shaping; no KL. The recipe fields' own defaults are DAPO's as
the HAPO authors ran it (eps_high 0.2; DAPO as published uses clip-higher 0.28, which the
paper/*-dapo recipes set)."""

from __future__ import annotations

from . import register_baseline
from .base import Baseline


@register_baseline("dapo")
class Dapo(Baseline):
    source = "DAPO, arXiv 2503.14476"
