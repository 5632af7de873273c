"""cProfile of the tiny job's training steps (no dynamic sampling/overlong/validation/token rows/
checkpoints, as in bench_trl): where one generation batch spends its time.

Run: .venv/bin/python bench/profile_step.py [--recipe tiny/dapo] [--steps 20] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_trl import PROJECT_OVERRIDES  # noqa: E402


def main(recipe: str = "tiny/dapo", steps: int = 20, top: int = 30, sort: str = "cumulative"):
    from hapo_cli.learner.trainer import Loop, train
    from hapo_cli.recipe import load_recipe

    rec = load_recipe(recipe, [f"train.max_steps={steps}", *PROJECT_OVERRIDES])
    prof = cProfile.Profile()
    original = Loop.train_step

    def profiled(self, step):
        if step <= 2:  # warm-up steps are not profiled
            return original(self, step)
        prof.enable()
        try:
            return original(self, step)
        finally:
            prof.disable()

    Loop.train_step = profiled
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(rec, output_dir=Path(tmp) / "run", overwrite=True, progress=False)
    finally:
        Loop.train_step = original
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats(sort).print_stats(top)
    print(f"{recipe}: {steps - 2} profiled steps")
    print(out.getvalue())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="tiny/dapo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="cumulative")
    a = ap.parse_args()
    main(a.recipe, a.steps, a.top, a.sort)
