"""Write small synthetic run and ablation directories in the ``analysis.schema`` format.

For tests and demos of ``analysis`` without training anything. The numbers follow simple
closed forms (see ``synthetic_metrics``) so tests can compute the expected plot data by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis import schema


def synthetic_metrics(step: int, seed: int, *, offset: float = 0.0, val_every: int = 2,
                      bench: str = "toy", k: int = 4) -> dict[str, Any]:
    """One metrics row. With s = seed, t = step, o = offset:

    entropy_mean = 1 + 0.1 s - 0.01 t (p20 = mean - 0.5, p80 = mean + 0.5);
    reward/acc = 0.2 + 0.01 t + o; response_len_mean = 100 + t (correct 90 + t,
    incorrect 110 + t); clip_frac_low_hi_ent = 0.02, _lo_ent = 0.01, high_hi_ent = 0.03,
    high_lo_ent = 0.005; adv token sums +-(10 + t), seq sums 12 + t and -(8 + t);
    every ``val_every`` steps val/<bench>/avg@k = 0.1 + 0.01 t + 0.02 s + o and
    val/<bench>/greedy = that + 0.05.
    """
    row: dict[str, Any] = {
        schema.STEP: step,
        schema.ENTROPY_MEAN: 1 + 0.1 * seed - 0.01 * step,
        schema.ENTROPY_P20: 0.5 + 0.1 * seed - 0.01 * step,
        schema.ENTROPY_P80: 1.5 + 0.1 * seed - 0.01 * step,
        schema.CLIP_FRAC_LOW: 0.015, schema.CLIP_FRAC_HIGH: 0.02,
        schema.CLIP_FRAC_LOW_HI_ENT: 0.02, schema.CLIP_FRAC_LOW_LO_ENT: 0.01,
        schema.CLIP_FRAC_HIGH_HI_ENT: 0.03, schema.CLIP_FRAC_HIGH_LO_ENT: 0.005,
        schema.ADV_POS_TOKEN_SUM: 10.0 + step, schema.ADV_NEG_TOKEN_SUM: -(10.0 + step),
        schema.ADV_SEQ_POS_TOKEN_SUM: 12.0 + step, schema.ADV_SEQ_NEG_TOKEN_SUM: -(8.0 + step),
        schema.RESPONSE_LEN_MEAN: 100.0 + step,
        schema.RESPONSE_LEN_CORRECT_MEAN: 90.0 + step,
        schema.RESPONSE_LEN_INCORRECT_MEAN: 110.0 + step,
        schema.CRITICAL_TOKENS: 5.0, schema.TEMPERATURE_MEAN: 1.0 + 0.001 * step,
        schema.FILL_RATE: 0.8, schema.MIXED_GROUP_FRAC: 0.5,
        schema.REWARD_MEAN: 0.2 + 0.01 * step + offset,
        schema.REWARD_ACC: 0.2 + 0.01 * step + offset,
        schema.TIME_STEP: 0.1,
    }
    if step % val_every == 0:
        acc = 0.1 + 0.01 * step + 0.02 * seed + offset
        row[schema.val_metric(bench, k)] = acc
        row[schema.val_greedy_metric(bench)] = acc + 0.05
    return row


def synthetic_tokens(step: int, seed: int, n: int = 64, *, adaptive: bool = True) -> pd.DataFrame:
    """``n`` token rows of one step with the clip side consistent with ratio and adv."""
    rng = np.random.default_rng(1000 * seed + step)
    vocab = np.array([" the", "=", "1", "2", "+", "wait", " so", "\n", "$", "x"])
    entropy = rng.gamma(0.7, 0.6, n)
    x = np.log(np.maximum(entropy, 1e-6))
    z = x - np.quantile(x, 0.8)
    h = np.where(z > 0, z / max(z.max(), 1e-6), z / max(-z.min(), 1e-6))
    ratio = np.exp(rng.normal(0.0, 0.2, n))
    adv = rng.choice([-1.0, 1.0], n) * rng.uniform(0.2, 1.5, n)
    eps = np.full(n, 0.2)
    side = np.where((ratio < 1 - eps) & (adv < 0), "low",
                    np.where((ratio > 1 + eps) & (adv > 0), "high", "none"))
    sample = np.arange(n) // 16
    acc = (sample % 2).astype(int)
    return pd.DataFrame({
        "step": step, "sample": sample, "position": np.arange(n) % 16,
        "token_id": np.arange(n) % len(vocab), "token_text": vocab[np.arange(n) % len(vocab)],
        "entropy": entropy, "h": h,
        "temperature": 1.0 + 0.05 * h if adaptive else np.ones(n),
        "ratio": ratio, "adv": adv, "adv_c": adv * (1 + h), "eps_low": eps, "eps_high": eps,
        "clip_side": side, "reward": acc.astype(float), "acc": acc,
    })


def write_run(
    path: Path,
    *,
    steps: int = 6,
    seed: int = 1,
    offset: float = 0.0,
    status: str = schema.STATUS_DONE,
    components: str = "ABCD",
    token_steps: tuple[int, ...] = (1, 3),
    adaptive: bool = True,
    evals: list[dict[str, Any]] | None = None,
    truncate_last: bool = False,
    run_name: str | None = None,
) -> list[dict[str, Any]]:
    """Write a run directory; returns the complete metrics rows written (not the torn one).

    ``truncate_last`` appends half of one more row without a newline, as a killed writer
    leaves it. ``token_steps=()`` writes no token samples.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = [synthetic_metrics(t, seed, offset=offset) for t in range(1, steps + 1)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if truncate_last:
        text += json.dumps(synthetic_metrics(steps + 1, seed, offset=offset))[:40]
    (path / schema.METRICS).write_text(text, encoding="utf-8")
    manifest = {"status": status, "seed": seed, "git_rev": "0000000", "versions": {},
                "start_time": "2025-01-01T00:00:00", "end_time": None,
                "run_name": run_name or path.name, "components": components, "algo": "hapo"}
    (path / schema.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    (path / schema.RECIPE).write_text(yaml.safe_dump({"seed": seed, "algo": {"name": "hapo"}}),
                                      encoding="utf-8")
    if token_steps:
        (path / schema.TOKENS_DIR).mkdir(exist_ok=True)
        for t in token_steps:
            synthetic_tokens(t, seed, adaptive=adaptive).to_parquet(
                path / schema.tokens_file(t), index=False)
    if evals:
        (path / schema.EVAL_DIR).mkdir(exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in evals)
        (path / schema.EVAL_DIR / "sweep.jsonl").write_text(text, encoding="utf-8")
    return rows


def write_ablation(
    path: Path,
    variants: dict[str, float | dict[int, float]],
    seeds: tuple[int, ...] = (1, 2),
    *,
    missing: tuple[str, ...] = (),
    **run_kwargs: Any,
) -> dict[str, Any]:
    """Write an ablation directory; ``variants`` maps a variant to its accuracy offset, one
    for all seeds or ``{seed: offset}`` (seeds it lacks get 0).

    Run folders named in ``missing`` are planned but not written. Returns the spec.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    plan, runs = [], {}
    for variant, offset in variants.items():
        for s in seeds:
            run_dir = schema.ablation_run_dir(variant, s)
            plan.append({"variant": variant, "seed": s, "run_dir": run_dir})
            if run_dir in missing:
                runs[run_dir] = {"status": "failed", "error": "killed"}
                continue
            o = offset.get(s, 0.0) if isinstance(offset, dict) else offset
            write_run(path / run_dir, seed=s, offset=o, components=variant, **run_kwargs)
            runs[run_dir] = {"status": "done", "error": None}
    spec = {"name": path.name, "plan": plan, "runs": runs}
    (path / schema.ABLATION).write_text(json.dumps(spec), encoding="utf-8")
    return spec
