"""`make bench`: every benchmark table in one run (no timed assertions anywhere in tests)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    bench_algo,
    bench_checkpoint,
    bench_fused,
    bench_kl,
    bench_lora,
    bench_packing,
    bench_strategy,
    bench_train,
    bench_trl,
    bench_vllm,
)


def main() -> None:
    for name, mod in (("algo", bench_algo), ("fused log-probs", bench_fused),
                      ("training step", bench_train),
                      ("learner update: padded vs packed vs token budget", bench_packing),
                      ("tiny job: the KL's reference pass, on vs off", bench_kl),
                      ("tiny job: LoRA vs full training", bench_lora),
                      ("tiny job: hapo DAPO / HAPO vs TRL GRPOTrainer", bench_trl),
                      ("rollout: vLLM vs HF", bench_vllm),
                      ("DDP, FSDP2, ZeRO-2, ZeRO-3: 2 processes, large vocabulary",
                       bench_strategy),
                      ("checkpoints and start-up: HF format vs DCP, FSDP2 and ZeRO-3, 2 processes",
                       bench_checkpoint)):
        print(f"\n=== {name} ===", flush=True)
        mod.main()


if __name__ == "__main__":
    main()
