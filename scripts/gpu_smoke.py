"""GPU smoke test: a few steps of the tiny recipe on CUDA in bf16, HF engine and (when
importable) vLLM, then a table of step time, tokens/s, accuracy and peak GPU memory.

Run: bash scripts/gpu_smoke.sh   (under 5 minutes on one GPU)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(engine: str, root: Path, steps: int) -> dict[str, object]:
    from hapo_cli.learner.trainer import train
    from hapo_cli.recipe import load_recipe

    overrides = [
        f"train.max_steps={steps}", "rollout.engine=" + engine, "train.mixed_precision=bf16",
        "eval.every=0", "eval.limit=64", "log.checkpoint_every=0", "train.threads=null",
        f"model.cache_dir={root / 'cache'}", "rollout.vllm.gpu_memory_utilization=0.3",
        "rollout.vllm.enforce_eager=true",
    ]
    rec = load_recipe("tiny/hapo", overrides)
    out = root / engine
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(rec, output_dir=out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "time/step_s" in r]
    tok = sum(r.get("rollout/response_len_mean", 0) * r.get("rollout/responses", 0)
              for r in steps_rows)
    gen = sum(r.get("time/gen_s", 0) for r in steps_rows)
    last = rows[-1]
    val = next((v for k, v in last.items() if k.endswith("/greedy")), None)
    return {
        "engine": engine, "status": summary.status, "steps": len(steps_rows),
        "step_s": sum(r["time/step_s"] for r in steps_rows) / max(len(steps_rows), 1),
        "gen_tok_s": tok / gen if gen else 0.0, "train_acc": last.get("reward/acc"),
        "val_greedy": val, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": wall,
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this smoke test needs a GPU", file=sys.stderr)
        return 2
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    engines = ["hf"]
    try:
        import vllm  # noqa: F401

        engines.append("vllm")
    except ImportError:
        print("vllm not importable: HF engine only")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for eng in engines:
            try:
                results.append(run(eng, Path(tmp), steps))
            except Exception as exc:  # noqa: BLE001 - report and go on to the next engine
                results.append({"engine": eng, "status": f"error: {exc!r}"[:200]})
    cols = ["engine", "status", "steps", "step_s", "gen_tok_s", "train_acc", "val_greedy",
            "peak_gpu_gib", "wall_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    return 0 if all(r.get("status") == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
