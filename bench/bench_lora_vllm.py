"""Weight sync into the colocated vLLM engine after an optimizer step: full parameters vs
`model.lora` (the merged weights W + scale B A, streamed by `lora.engine_weights`), measured
side by side in one process (alternating rounds, medians). Needs vLLM and peft (the CPU build
works: `.venv-vllm/bin/python bench/bench_lora_vllm.py`).

Workload: the embedded tiny model (fp32), LoRA rank 8 on every linear layer; one
`VLLMEngine.sync_from` per round (reload_weights on CPU). The rest of a step (rollout, learner)
is the same work for both, less the frozen base's gradients and optimizer state under LoRA.

Run: python bench/bench_lora_vllm.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(rounds: int = 8) -> list[dict[str, object]]:
    try:
        import peft  # noqa: F401
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM or peft not importable here: skipped (.venv-vllm with the lora extra)")
        return []
    import torch
    from rich.console import Console
    from rich.table import Table

    from hapo_cli.lora import apply_lora
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import LoraConfig, TinyModelConfig, VllmConfig
    from hapo_cli.rollout.vllm import VLLMEngine

    tok = build_tokenizer()
    torch.manual_seed(0)
    full = build_tiny_model(TinyModelConfig(num_heads=2), tok).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        full.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        engine = VLLMEngine(tmp, VllmConfig(), tokenizer=tok, max_model_len=64,
                            dtype="float32", seed=0)
        torch.manual_seed(0)
        lora = apply_lora(build_tiny_model(TinyModelConfig(num_heads=2), tok).float().eval(),
                          LoraConfig(rank=8, alpha=16, target_modules="all-linear"))
        cases = {"full": full, "lora (merged)": lora}
        for m in cases.values():  # warm-up, not timed
            engine.sync_from(m)
        secs: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
                t = time.perf_counter()
                engine.sync_from(cases[name])
                secs[name].append(time.perf_counter() - t)
    n_full = sum(p.numel() for p in full.parameters())
    n_train = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    table = Table(title=f"colocated vLLM weight sync, tiny model, median of {rounds} rounds")
    for col in ("weights", "trainable params", "sync ms"):
        table.add_column(col, justify="right")
    out = []
    for name, n in (("full", n_full), ("lora (merged)", n_train)):
        ms = 1000 * statistics.median(secs[name])
        table.add_row(name, f"{n:,}", f"{ms:.1f}")
        out.append({"weights": name, "trainable": n, "sync_ms": ms})
    Console().print(table)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    main(parser.parse_args().rounds)
