"""LoRA vs full training on the tiny job, side by side in one process: step time (median, with
its parts), trainable parameters and the AdamW state the optimizer holds (bytes, read from
each run's last checkpoint), same recipe, warm-up policy and seed.

Run: .venv/bin/python bench/bench_lora.py [--steps 12] [--rank 8] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

RECIPE = "tiny/hapo"


def _optimizer_bytes(ckpt: Path) -> int:
    """Bytes of the tensors in a checkpoint's optimizer state (AdamW: exp_avg, exp_avg_sq)."""
    import torch

    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _run(name: str, steps: int, root: Path, extra: list[str], cache: str | None,
         ) -> dict[str, float]:
    from hapo_cli.learner.trainer import train
    from hapo_cli.recipe import load_recipe

    overrides = [f"train.max_steps={steps}", "eval.every=0", "eval.at_start=false",
                 f"log.checkpoint_every={steps}", "log.checkpoint_format=hf",
                 "log.token_sample_every=0",
                 *([f"model.cache_dir={cache}"] if cache else []), *extra]
    out = root / name
    train(load_recipe(RECIPE, overrides), output_dir=out, overwrite=True, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "time/step_s" in r][2:]  # drop warm-up steps
    med = {k: statistics.median(r.get(k, 0.0) for r in rows)
           for k in ("time/gen_s", "time/old_logp_s", "time/train_s", "time/step_s")}
    manifest = json.loads((out / "manifest.json").read_text())
    med["params"] = manifest["num_parameters"]
    med["trainable"] = manifest["trainable_parameters"]
    med["optim_bytes"] = _optimizer_bytes(out / "checkpoints" / f"step-{steps:06d}")
    return med


def main(steps: int = 12, rank: int = 8, cache: str | None = None) -> list[dict[str, object]]:
    lora = f"model.lora={{rank: {rank}, alpha: {2 * rank}, target_modules: all-linear}}"
    with tempfile.TemporaryDirectory() as tmp:
        # the shared warm-up is built (or found in the cache) by the first run
        res = {"full": _run("full", steps, Path(tmp), [], cache),
               f"lora r={rank}": _run("lora", steps, Path(tmp), [lora], cache)}
    table = Table(title=f"{RECIPE}: full vs LoRA (all-linear), median of {steps - 2} steps")
    for col in ("training", "trainable params", "AdamW state", "gen s", "old logp s",
                "update s", "step s"):
        table.add_column(col)
    rows = []
    for name, m in res.items():
        table.add_row(name, f"{m['trainable']:,} of {m['params']:,}",
                      f"{m['optim_bytes'] / 1024:,.1f} KiB", f"{m['time/gen_s']:.3f}",
                      f"{m['time/old_logp_s']:.3f}", f"{m['time/train_s']:.3f}",
                      f"{m['time/step_s']:.3f}")
        rows.append({"training": name, **m})
    full, low = res["full"], res[f"lora r={rank}"]
    console = Console(width=120)
    console.print(table)
    console.print(
        f"LoRA/full: step time {low['time/step_s'] / full['time/step_s']:.2f}, update "
        f"{low['time/train_s'] / full['time/train_s']:.2f}, optimizer state "
        f"{low['optim_bytes'] / full['optim_bytes']:.3f} (generation differs with what each "
        "policy samples: compare the update)")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cache-dir", default=None, help="model.cache_dir (default: the recipe's)")
    a = p.parse_args()
    main(a.steps, a.rank, a.cache_dir)
