"""A/B: the tiny job's step time under two checkouts of the project, alternating in one run.

Each (checkout, side) runs in its own process with that checkout first on sys.path, so rounds of
the old and the new code interleave on the same machine state. `side` is tiny/dapo, tiny/hapo (as
bench_trl runs them) or trl (TRL's GRPOTrainer, independent of the checkout: run once per round).

Run: .venv/bin/python bench/bench_ab.py /path/to/old-checkout [--rounds 3] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib.util, json, sys, tempfile
from pathlib import Path
root, side, steps, bench = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spec = importlib.util.spec_from_file_location("bench_trl", bench)
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
sys.path[:] = [root] + [p for p in sys.path if Path(p).resolve() != Path(bench).parent.parent]
import hapo_cli
assert Path(hapo_cli.__file__).resolve().is_relative_to(Path(root).resolve()), hapo_cli.__file__
with tempfile.TemporaryDirectory() as tmp:
    fn = mod.trl_step_times if side == "trl" else mod.project_step_times
    times = fn("tiny/dapo" if side == "trl" else side, steps, Path(tmp))
print("TIMES " + json.dumps(times))
"""


def run_side(root: Path, side: str, steps: int) -> list[tuple[float, float]]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), side, str(steps),
                          str(HERE / "bench" / "bench_trl.py")],
                         capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("TIMES ")][-1]
    return [tuple(t) for t in json.loads(line[6:])]


def main(old: Path, rounds: int = 3, steps: int = 16, trl: bool = True) -> dict[str, float]:
    sides = [("old", old, "tiny/dapo"), ("new", HERE, "tiny/dapo"),
             ("old", old, "tiny/hapo"), ("new", HERE, "tiny/hapo")]
    if trl:
        sides.append(("", HERE, "trl"))
    times: dict[str, list[tuple[float, float]]] = {}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        this: dict[str, float] = {}
        for tag, root, side in sides:
            key = f"{tag} {side}".strip()
            got = run_side(root, side, steps)
            times.setdefault(key, []).extend(got)
            this[key] = statistics.median(c for _, c in got)
        per_round.append(this)
        print(f"round {r + 1} (median CPU s): " + "  ".join(f"{k} {v:.3f}" for k, v in this.items())
              + f"  | new/old DAPO {this['new tiny/dapo'] / this['old tiny/dapo']:.2f}"
              + (f"  TRL/new DAPO {this['trl'] / this['new tiny/dapo']:.2f}" if trl else ""),
              flush=True)
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    print(f"\nmedians over {rounds} alternating rounds x {steps} timed steps "
          "(s per generation batch; CPU = process time, one compute thread)")
    for k in times:
        print(f"  {k:16s} CPU {cpu[k]:.3f}  wall {wall[k]:.3f}")
    for tag in ("old", "new"):
        d, h = f"{tag} tiny/dapo", f"{tag} tiny/hapo"
        line = f"  {tag}: HAPO/DAPO CPU {cpu[h] / cpu[d]:.2f} (wall {wall[h] / wall[d]:.2f})"
        if "trl" in cpu:
            line += f"  TRL/DAPO CPU {cpu['trl'] / cpu[d]:.2f} (wall {wall['trl'] / wall[d]:.2f})"
        print(line)
    def round_median(a: str, b: str) -> float:
        return statistics.median(x[a] / x[b] for x in per_round)

    print("  median of per-round CPU ratios: "
          f"new/old DAPO {round_median('new tiny/dapo', 'old tiny/dapo'):.2f}  "
          f"new/old HAPO {round_median('new tiny/hapo', 'old tiny/hapo'):.2f}  "
          f"new HAPO/DAPO {round_median('new tiny/hapo', 'new tiny/dapo'):.2f}  "
          f"old HAPO/DAPO {round_median('old tiny/hapo', 'old tiny/dapo'):.2f}"
          + (f"  TRL/new DAPO {round_median('trl', 'new tiny/dapo'):.2f}"
             f"  TRL/old DAPO {round_median('trl', 'old tiny/dapo'):.2f}" if trl else ""))
    for side in ("tiny/dapo", "tiny/hapo"):
        print(f"  new/old {side}: CPU {cpu['new ' + side] / cpu['old ' + side]:.2f} "
              f"(wall {wall['new ' + side] / wall['old ' + side]:.2f})")
    return cpu


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("old", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-trl", action="store_true")
    a = ap.parse_args()
    main(a.old, a.rounds, a.steps, not a.no_trl)
