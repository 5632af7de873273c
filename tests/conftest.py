"""Shared pieces of the end-to-end tests: the small tiny-recipe budget and one warm-up cache for
the whole session (every test that trains builds the same 150-step warm-up policy once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import schema

SMALL = [
    "model.warmup.steps=150",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "train.micro_batch_size=8",
    "rollout.n=4",
    "eval.limit=8",
    "eval.n=2",
    "eval.every=2",
    "log.token_sample_every=2",
    "log.checkpoint_every=2",
    "train.dynamic_sampling.enabled=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmup-cache")


def sets(cache_dir: Path, *extra: str) -> list[str]:
    """`--set` arguments: SMALL, the shared cache, then `extra` (later ones win)."""
    out: list[str] = []
    for s in [*SMALL, f"model.cache_dir={cache_dir}", *extra]:
        out += ["--set", s]
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines() if x.strip()]


def strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
