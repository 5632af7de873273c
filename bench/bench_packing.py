"""Padded vs packed learner updates, and token-budget micro-batches: step time and peak memory.

One full update of a model of realistic proportions at CPU size (Qwen2 architecture, hidden 512,
4 layers, vocabulary 151,936, fused log-probs on): the old-log-prob pass (no grad) and one PPO
step (forward + backward of every micro-batch, `algo.policy_loss`, AdamW step) over R responses
whose lengths follow a long tail like a reasoning model's (log-normal, mean ~35 % of the limit,
clipped to [8, limit]; prompts of 64-192 tokens). Three ways, each in its own subprocess (peak
RSS from `ru_maxrss`, less the RSS after the model and optimizer state exist):

- padded:  micro-batches of 8 responses, each row padded to the batch's longest (hapo's path
  before packing; the fused LM head already skipped padded positions, so the padding costs the
  transformer body and attention, not the head);
- packed:  the same micro-batches, one padding-free row each (`train.packing`);
- packed + budget: micro-batches by a token budget (`train.max_tokens_per_micro_batch`).

Then the longest response is doubled (one response at 2 x limit) for padded and packed + budget:
the padded peak grows with the longest row, the budgeted one is set by the budget.

    python bench/bench_packing.py [--responses 32] [--limit 512] [--budget 1536] [--vocab V] [--layers L]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def lengths(n: int, limit: int, seed: int = 0, double_longest: bool = False):
    """(prompt lengths, response lengths): log-normal responses, mean ~0.35 x limit."""
    import random

    rng = random.Random(seed)
    sigma = 0.8
    mu = math.log(0.35 * limit) - sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    resp = [min(limit, max(8, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]
    prompts = [rng.randint(64, 192) for _ in range(n)]
    if double_longest:
        resp[resp.index(max(resp))] = 2 * limit
    return prompts, resp


def _child(mode: str, n: int, limit: int, budget: int, double: bool, vocab: int,
           layers: int) -> dict:
    import resource

    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT))
    from hapo_cli import algo
    from hapo_cli.learner.forward import response_logprobs
    from hapo_cli.learner.microbatch import plan_micro_batches

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = tf.Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompts, resp = lengths(n, limit, double_longest=double)
    P, T = max(prompts), max(resp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, P + T), generator=g)
    am = torch.zeros(n, P + T, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, resp)):
        am[b, P - p : P] = 1
        am[b, P : P + r] = 1
    mask = am[:, P:].bool()
    adv = torch.randn(n, T, generator=g)
    # optimizer state exists before the baseline RSS (a real learner carries it across steps)
    for p_ in model.parameters():
        opt.state[p_]["step"] = torch.tensor(0.0)
        opt.state[p_]["exp_avg"] = torch.zeros_like(p_)
        opt.state[p_]["exp_avg_sq"] = torch.zeros_like(p_)
    base_kb = _rss_kb()
    packed = mode != "padded"
    plan = plan_micro_batches(am.sum(-1), [slice(0, n)], 8,
                              budget if mode == "budget" else None)[0]
    t0 = time.perf_counter()
    old = torch.zeros(n, T)
    with torch.no_grad():
        for rows in plan:
            lp, _ = response_logprobs(model, ids[rows], am[rows], T, None, packed=packed)
            old[rows] = lp
    t1 = time.perf_counter()
    normalizer = float(mask.sum())
    for rows in plan:
        lp, _ = response_logprobs(model, ids[rows], am[rows], T, None, packed=packed,
                                  entropy=False)
        loss, _ = algo.policy_loss(lp, old[rows], adv[rows], mask[rows], 0.2, 0.2,
                                   normalizer=normalizer)
        loss.backward()
    opt.step()
    t2 = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"old_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
            "peak_extra_mb": (peak_kb - base_kb) / 1024, "micro_batches": len(plan),
            "tokens": int(am.sum()), "padded_tokens": n * (P + T), "longest": T}


def _run(mode: str, args, double: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--responses", str(args.responses),
           "--limit", str(args.limit), "--budget", str(args.budget), "--vocab", str(args.vocab),
           "--layers", str(args.layers)]
    if double:
        cmd.append("--double")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=32)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--budget", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None,
                    help="default: two tables, vocabulary 151,936 x 4 layers (the LM head is "
                         "~85%% of the FLOPs) and 8,192 x 8 layers (the body dominates, as in a 7B)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--child", choices=["padded", "packed", "budget"])
    ap.add_argument("--double", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_child(args.child, args.responses, args.limit, args.budget,
                                args.double, args.vocab, args.layers)))
        return
    if args.vocab is None:
        for vocab, layers in ((151_936, args.layers or 4), (8192, args.layers or 8)):
            args.vocab, args.layers = vocab, layers
            _table(args)
        return
    args.layers = args.layers or 4
    _table(args)


def _table(args) -> None:
    from rich.console import Console
    from rich.table import Table

    names = {"padded": "padded, 8 a micro-batch", "packed": "packed, 8 a micro-batch",
             "budget": f"packed, budget {args.budget} tokens"}
    rows = [(m, False, _run(m, args, False)) for m in ("padded", "packed", "budget")]
    rows += [(m, True, _run(m, args, True)) for m in ("padded", "budget")]
    base = rows[0][2]
    t = Table(title=f"one update (old log-probs + PPO step), {args.responses} responses, "
                    f"limit {args.limit}, vocabulary {args.vocab}, {args.layers} layers, "
                    f"{args.threads} threads")
    for c in ("case", "micro-batches", "longest", "tokens (real / in forwards)", "old-logp s",
              "update s", "step s", "x padded", "peak extra MB", "x padded"):
        t.add_column(c)
    for mode, double, r in rows:
        ref = rows[3][2] if double else base
        fwd_tokens = r["padded_tokens"] if mode == "padded" else r["tokens"]
        t.add_row(names[mode] + (" (longest x2)" if double else ""), str(r["micro_batches"]),
                  str(r["longest"]), f"{r['tokens']} / {fwd_tokens}", f"{r['old_s']:.1f}",
                  f"{r['update_s']:.1f}", f"{r['step_s']:.1f}",
                  f"{r['step_s'] / ref['step_s']:.2f}", f"{r['peak_extra_mb']:.0f}",
                  f"{r['peak_extra_mb'] / ref['peak_extra_mb']:.2f}")
    Console(width=180).print(t)


if __name__ == "__main__":
    main()
