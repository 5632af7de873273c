"""bench/bench_trl.py: the TRL side is the job the issue describes, and skips cleanly without TRL."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_trl.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trl_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_trl_the_row_is_skipped_with_one_line(monkeypatch):
    real = builtins.__import__

    def no_trl(name, *a, **k):
        if name == "trl" or name.startswith("trl."):
            raise ImportError("No module named 'trl'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trl)
    line = _bench().trl_available()
    assert line is not None and "\n" not in line
    assert line.startswith("TRL row skipped") and ".[bench]" in line


def test_trl_config_is_the_issues_job(tmp_path):
    pytest.importorskip("trl")
    from hapo_cli.recipe import load_recipe

    cfg = _bench().trl_config(load_recipe("tiny/dapo", []), tmp_path, gens=3)
    assert cfg.per_device_train_batch_size == 64 and cfg.gradient_accumulation_steps == 1
    assert cfg.steps_per_generation == 2 and cfg.num_generations == 8
    assert cfg.generation_batch_size == 128  # 16 prompts x 8 per generation
    assert cfg.loss_type == "dapo" and cfg.beta == 0.0 and cfg.num_iterations == 1
    assert cfg.max_completion_length == 32 and cfg.temperature == 1.0 and cfg.top_k == 0
    assert not cfg.use_vllm and not cfg.bf16 and cfg.max_steps == 6
