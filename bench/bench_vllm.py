"""Rollout throughput: the vLLM engine vs the HF engine, and A's overhead inside vLLM, measured
side by side in one process (alternating rounds, medians). Needs vLLM (its CPU build works:
`.venv-vllm/bin/python bench/bench_vllm.py`); `make bench` runs it when that venv exists.

Workload: the tiny recipe's rollout, 16 prompts x 8 samples x <= 32 new tokens, on the embedded
tiny model (random weights: responses run to the length limit, so every round decodes the same
number of tokens).

Run: python bench/bench_vllm.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _model(root: Path):
    import torch

    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(num_heads=2), tok).float().eval()  # head_dim 32
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return model, tok


def main(rounds: int = 6) -> list[dict[str, object]]:
    if not vllm_available():
        print("vLLM not importable here: skipped (make test-vllm builds .venv-vllm; then "
              ".venv-vllm/bin/python bench/bench_vllm.py)")
        return []
    from rich.console import Console
    from rich.table import Table

    from hapo_cli.algo import EntropyStats
    from hapo_cli.recipe import VllmConfig
    from hapo_cli.rollout import HFEngine, SamplingSpec
    from hapo_cli.rollout.vllm import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = _model(Path(tmp))
        t0 = time.perf_counter()
        vllm_engine = VLLMEngine(tmp, VllmConfig(), tokenizer=tok, max_model_len=64,
                                 dtype="float32", seed=0)
        start_s = time.perf_counter() - t0
        hf_engine = HFEngine(model, tok, batch_size=256)
        prompts = [tok(f"{a}+{a + 3}-{a // 2}=", add_special_tokens=False)["input_ids"]
                   for a in range(10, 26)]
        plain = SamplingSpec(n=8, temperature=1.0, max_new_tokens=32)
        adaptive = SamplingSpec(n=8, temperature=1.0, max_new_tokens=32, adaptive=True, tau=0.05)
        stats = EntropyStats(rho=1.0, std=0.5, scale_pos=1.5, scale_neg=2.0)
        cases = {
            "hf plain": (hf_engine, plain, None),
            "hf A": (hf_engine, adaptive, stats),
            "vllm plain": (vllm_engine, plain, None),
            "vllm A": (vllm_engine, adaptive, stats),
        }
        for engine, spec, st in cases.values():  # warm-up round, not timed
            engine.generate(prompts, spec, st, seed=0)
        rates: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                engine, spec, st = cases[name]
                t = time.perf_counter()
                batch = engine.generate(prompts, spec, st, seed=r + 1)
                rates[name].append(batch.num_tokens / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    table = Table(title=f"rollout tokens/s, 16 x 8 x <=32 tokens, median of {rounds} rounds "
                        f"(vLLM engine start {start_s:.1f} s)")
    for col in ("engine", "plain tok/s", "A tok/s", "A / plain"):
        table.add_column(col, justify="right")
    out = []
    for eng in ("hf", "vllm"):
        p, a = med[f"{eng} plain"], med[f"{eng} A"]
        table.add_row(eng, f"{p:,.0f}", f"{a:,.0f}", f"{a / p:.3f}")
        out.append({"engine": eng, "plain": p, "adaptive": a, "ratio": a / p})
    Console().print(table)
    print(f"vLLM / HF (plain): {med['vllm plain'] / med['hf plain']:.2f}x")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    main(parser.parse_args().rounds)
