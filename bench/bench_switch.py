"""Step-level A/B inside one training run: odd steps run the previous paths (generic HF decode
loop, learner scoring pass), even steps the new ones (fast decode step, reused behaviour
log-probs). Neighbouring steps see the same machine load, so their ratio is robust where
alternating whole runs is not (a shared machine's load drifts within seconds).

Run: .venv/bin/python bench/bench_switch.py [--recipe tiny/dapo] [--pairs 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_trl import PROJECT_OVERRIDES, WARMUP_STEPS  # noqa: E402


def main(recipe: str = "tiny/dapo", pairs: int = 16) -> dict[str, float]:
    import hapo_cli.learner.trainer as trainer_mod
    from hapo_cli.learner.trainer import train
    from hapo_cli.recipe import load_recipe

    rec = load_recipe(recipe, [f"train.max_steps={WARMUP_STEPS + 2 * pairs}", *PROJECT_OVERRIDES])
    real_reuse = trainer_mod.reuse_behaviour_logp
    original = trainer_mod.Loop.train_step
    mode = {"new": True}
    times: dict[str, list[float]] = {"old": [], "new": []}

    def reuse(*args):
        return real_reuse(*args) if mode["new"] else None

    def timed(self, step):
        mode["new"] = step % 2 == 0
        self.engine.fast_decode = mode["new"]
        c0 = time.process_time()
        row = original(self, step)
        if step > WARMUP_STEPS:
            times["new" if mode["new"] else "old"].append(time.process_time() - c0)
        return row

    trainer_mod.reuse_behaviour_logp, trainer_mod.Loop.train_step = reuse, timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(rec, output_dir=Path(tmp) / "run", overwrite=True, progress=False)
    finally:
        trainer_mod.reuse_behaviour_logp, trainer_mod.Loop.train_step = real_reuse, original
    old, new = times["old"], times["new"]
    pair = [n / o for o, n in zip(old, new)]
    out = {"old": statistics.median(old), "new": statistics.median(new),
           "new/old": statistics.median(new) / statistics.median(old),
           "pair median": statistics.median(pair)}
    print(f"{recipe}, {pairs} step pairs, CPU s per generation batch: old {out['old']:.3f}  "
          f"new {out['new']:.3f}  new/old {out['new/old']:.2f}  "
          f"(median of adjacent-pair ratios {out['pair median']:.2f})")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="tiny/dapo")
    ap.add_argument("--pairs", type=int, default=16)
    a = ap.parse_args()
    main(a.recipe, a.pairs)
