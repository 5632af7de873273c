"""Shared pieces of the end-to-end tests: the small tiny-recipe budget and one warm-up cache for
the whole session (every test that trains builds the same 150-step warm-up policy once)."""

from __future__ import annotations

import json
import re
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


@pytest.fixture(scope="session")
def warm_cache(cache_dir: Path) -> Path:
    """`cache_dir` with the tiny arithmetic task's 150-step warm-up policy already in it (the
    key tiny/hapo, dapo, grpo and forking share), built here once for the session, so a
    multi-process launch finds it and no module pays for its own (~50 s each)."""
    from hapo_cli.models import warmup_policy
    from hapo_cli.recipe import load_recipe

    rec = load_recipe("tiny/hapo", ["model.warmup.steps=150", f"model.cache_dir={cache_dir}"])
    warmup_policy(rec.model, rec.data)
    return cache_dir


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


# The lines of a failed multi-process run's output that say what happened: Python errors and
# tracebacks (accelerate prefixes them "[rankN]:"), C++ aborts ("terminate called ...",
# "what(): ..."), faulthandler's stacks ("File ..."); not torchrun's own traceback (it only says
# that a rank failed) nor deprecation warnings.
CAUSE = re.compile(r"Error|Exception|Traceback|terminate called|what\(\)|Fatal Python|"
                   r"^(\[rank\d+\]:)?\s*File \"|Thread 0x|Current thread")
LAUNCHER = re.compile(r"torch/distributed/(run|launcher|elastic)|frozen runpy|ChildFailedError|"
                      r"FutureWarning|accelerate/commands")


def failure_report(res, done_marker: str | None = None) -> str:
    """The tail of a failed `torchrun` / `accelerate launch`, then the lines naming the cause,
    last (CI shows the end of the output). `done_marker`: a line a worker prints per rank once
    its results are written ("<marker> rank N"), to tell a crash from a teardown abort."""
    out = (res.stdout or "") + (res.stderr or "")
    cause = [ln for ln in out.splitlines()
             if (CAUSE.search(ln) or (done_marker and done_marker in ln))
             and not LAUNCHER.search(ln)]
    tail = f"\n--- exit {res.returncode}"
    if done_marker:
        finished = sorted(int(m) for m in re.findall(re.escape(done_marker) + r" rank (\d+)", out))
        tail += f"; ranks that wrote every case: {finished}"
    return f"{out[-1500:]}\n--- the lines naming the cause ---\n" + "\n".join(cause[-40:]) + tail
