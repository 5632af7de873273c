"""The cost of the KL term: the tiny job (recipes/tiny/grpo: 16 prompts x 8 responses, <= 32
tokens) with the reference pass (algo.kl_coef 0.04, k3, the reference scored in the old-policy
pass) and without it (algo.kl_coef 0: no reference model is loaded). Same seed, same warm-up
policy; each run its own `hapo train` process, one torch thread. Reports the median per-step
seconds over the steps after the first (time/step_s, time/old_logp_s, time/ref_logp_s,
time/train_s), the KL logged at the last step, and the reference pass's share of the step.
(old_logp_s is ~0: the HF engine's behaviour log-probs are reused as the old policy's.)

Measured on 2 shared CPU cores (other jobs running, so step times vary by +-20 % run to run):
reference pass 0.21 s per step, 13 % of the 1.56 s KL-on step; actor/kl 0.031 at step 12.

    python bench/bench_kl.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("time/step_s", "time/old_logp_s", "time/ref_logp_s", "time/train_s")


def run(out: Path, kl_coef: float, steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "hapo_cli.cli", "train", "--recipe", "tiny/grpo",
           "--max-steps", str(steps), "--output", str(out), "--set", f"algo.kl_coef={kl_coef}",
           "--set", "eval.every=0", "--set", "eval.at_start=false", "--set",
           "log.checkpoint_every=0", "--set", "log.token_sample_every=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"bench_kl: {' '.join(cmd[2:6])} failed:\n{res.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("step", 0) >= 2 and "time/step_s" in r]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run(Path(tmp) / name, coef, args.steps)
               for name, coef in (("KL off", 0.0), ("KL on (0.04, k3)", 0.04))}
    print(f"{'run':<18}" + "".join(f"{k.removeprefix('time/'):>14}" for k in KEYS)
          + f"{'actor/kl':>12}")
    base = None
    for name, rows in res.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in KEYS}
        base = base or med["time/step_s"]
        kl = rows[-1].get("actor/kl", float("nan"))
        print(f"{name:<18}" + "".join(f"{med[k]:>14.4f}" for k in KEYS) + f"{kl:>12.2e}")
    on_rows = res["KL on (0.04, k3)"]
    on = statistics.median(r["time/step_s"] for r in on_rows)
    ref = statistics.median(r["time/ref_logp_s"] for r in on_rows)
    # the reference pass's own time is the cost; the step-time ratio also carries the run-to-run
    # noise of generation (and of a shared machine)
    print(f"reference pass: {ref:.3f} s per step = {ref / on:.1%} of the KL-on step "
          f"(step time {base:.3f} s off, {on:.3f} s on: {on / base - 1:+.1%}; median of steps "
          f"2..{args.steps})")

if __name__ == "__main__":
    main(sys.argv[1:])
