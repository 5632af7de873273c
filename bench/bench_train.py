"""Step-time breakdown of the tiny recipe, HAPO vs DAPO, measured side by side in one process.

Run: .venv/bin/python bench/bench_train.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _run(recipe: str, steps: int, root: Path) -> dict[str, float]:
    from hapo_cli.learner.trainer import train
    from hapo_cli.recipe import load_recipe

    overrides = [f"train.max_steps={steps}", "eval.every=0", "eval.at_start=false",
                 "log.checkpoint_every=0", "log.token_sample_every=0"]
    rec = load_recipe(recipe, overrides)
    out = root / recipe.replace("/", "-")
    train(rec, output_dir=out, overwrite=True, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "time/step_s" in r][2:]  # drop warm-up steps
    med = {k: statistics.median(r.get(k, 0.0) for r in rows)
           for k in ("time/gen_s", "time/old_logp_s", "time/train_s", "time/step_s")}
    med["other"] = med["time/step_s"] - med["time/gen_s"] - med["time/old_logp_s"] - \
        med["time/train_s"]
    med["gen_batches"] = statistics.mean(r.get("rollout/gen_batches", 1.0) for r in rows)
    return med


def main(steps: int = 20) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        # the shared warm-up is built (or found in the cache) by the first run
        res = {name: _run(f"tiny/{name}", steps, Path(tmp)) for name in ("dapo", "hapo")}
    table = Table(title=f"tiny recipe step time (median of {steps - 2} steps, seconds)")
    for col in ("recipe", "generation", "old log-probs", "update", "other", "step",
                "gen batches"):
        table.add_column(col)
    rows = []
    for name, m in res.items():
        table.add_row(name, f"{m['time/gen_s']:.3f}", f"{m['time/old_logp_s']:.3f}",
                      f"{m['time/train_s']:.3f}", f"{m['other']:.3f}", f"{m['time/step_s']:.3f}",
                      f"{m['gen_batches']:.2f}")
        rows.append({"recipe": name, **m})
    ratio = res["hapo"]["time/step_s"] / res["dapo"]["time/step_s"]
    upd = (res["hapo"]["time/old_logp_s"] + res["hapo"]["time/train_s"]) / (
        res["dapo"]["time/old_logp_s"] + res["dapo"]["time/train_s"])
    Console().print(table)
    Console().print(f"HAPO/DAPO step-time ratio: {ratio:.2f} (learner part only: {upd:.2f})")
    rows.append({"recipe": "ratio", "step": ratio, "learner": upd})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    main(ap.parse_args().steps)
