"""Benchmarks of hapo_cli.algo (CPU by default; pass --device cuda on a GPU machine).

1. Loss cost of HAPO vs DAPO, forward + backward, B = 512 responses x T = 2048 tokens:
   DAPO = `policy_loss` alone; HAPO = `entropy_stats` + `normalized_entropy` + D's bounds +
   C's redistribution + `policy_loss` with the h / adv_before metrics. Timed side by side in
   one process (alternating, median of repeats), so the ratio is what matters.
2. Token-level group advantages (B), vectorised vs a Python loop over groups, 4,096 responses.
3. Peak memory of chunked vs naive log-probs + entropy, forward + backward, V = 151,936:
   each variant runs in its own subprocess, which allocates bf16 logits (N, V) requiring grad,
   records its resident set size, runs once, and exits; the parent reads the child's peak RSS
   (the child's own `getrusage().ru_maxrss` at exit). Reported: peak RSS - RSS after allocating the inputs
   (includes the bf16 gradient of the logits, which both variants produce).

    .venv/bin/python bench/bench_algo.py [--device cpu] [--n-tokens 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hapo_cli.algo import (  # noqa: E402
    adaptive_clip_bounds,
    entropy_stats,
    logprobs_and_entropy,
    normalized_entropy,
    policy_loss,
    redistribute_advantages,
    token_level_group_advantages,
)

V_QWEN = 151_936


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _loss_inputs(b: int, t: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 8, t + 1, (b,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    old_logp = (-torch.rand(b, t, generator=gen) * 4).to(device)
    logp = (old_logp.cpu() + torch.randn(b, t, generator=gen) * 0.2).to(device)
    adv = torch.randn(b, t, generator=gen).to(device)
    entropy = (torch.rand(b, t, generator=gen) ** 4 * 5).to(device)
    return logp, old_logp, adv, mask, entropy


def _dapo_step(logp, old_logp, adv, mask, entropy):
    lp = logp.detach().requires_grad_()
    loss, _ = policy_loss(lp, old_logp, adv, mask, 0.2, 0.28)
    loss.backward()
    return lp.grad


def _hapo_step(logp, old_logp, adv, mask, entropy):
    lp = logp.detach().requires_grad_()
    stats = entropy_stats(entropy, mask, 0.8, "paper")
    h = normalized_entropy(entropy, stats)
    lo, hi = adaptive_clip_bounds(h, 0.2, 0.28, alpha=1.0)
    ratio = torch.exp((lp - old_logp).clamp(-20, 20)).detach()
    adv_c = redistribute_advantages(adv, h, ratio, lo, hi, beta=1.0)
    loss, _ = policy_loss(lp, old_logp, adv_c, mask, lo, hi, h=h, adv_before=adv)
    loss.backward()
    return lp.grad


def bench_loss(b: int, t: int, device: str, repeats: int) -> dict:
    inputs = _loss_inputs(b, t, device)
    times: dict[str, list[float]] = {"dapo": [], "hapo": []}
    for fn in (_dapo_step, _hapo_step):  # warm-up
        fn(*inputs)
    for _ in range(repeats):
        for name, fn in (("dapo", _dapo_step), ("hapo", _hapo_step)):
            _sync(device)
            t0 = time.perf_counter()
            fn(*inputs)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    dapo, hapo = statistics.median(times["dapo"]), statistics.median(times["hapo"])
    return {"bench": f"loss fwd+bwd B={b} T={t} ({device})", "baseline": f"DAPO {dapo * 1e3:.1f} ms",
            "ours": f"HAPO A-stats+C+D {hapo * 1e3:.1f} ms", "ratio": f"{hapo / dapo:.2f}x time",
            "dapo_s": dapo, "hapo_s": hapo}


def _token_adv_loop(scores, mask, ids, eps=1e-6, thr=5.0):
    """Reference: one Python iteration per group (the released code's structure)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for g in torch.unique(ids).tolist():
        idx = (ids == g).nonzero().squeeze(1)
        s, m = scores[idx].double(), mask[idx]
        vals = s.unsqueeze(1).expand_as(m)[m]
        mu, sd = vals.mean(), vals.std(unbiased=False)
        a = (s - mu) / (sd + eps)
        if bool((a[m.any(1)].abs() >= thr).any()):
            mean, std = (s.mean(), s.std()) if len(idx) > 1 else (0.0, 1.0)
            a = (s - mean) / (std + eps)
        out[idx] = (a.unsqueeze(1) * m).float()
    return out


def bench_advantages(b: int, g: int, t: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.arange(b) // g
    scores = torch.randint(0, 2, (b,), generator=gen).float()
    mask = torch.arange(t).unsqueeze(0) < torch.randint(1, t + 1, (b,), generator=gen).unsqueeze(1)
    vec = loop = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = token_level_group_advantages(scores, mask, ids)
        vec = min(vec, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = _token_adv_loop(scores, mask, ids)
        loop = min(loop, time.perf_counter() - t0)
    torch.testing.assert_close(a, ref)
    return {"bench": f"token-level adv B={b} (G={g}, T={t})", "baseline": f"loop {loop * 1e3:.1f} ms",
            "ours": f"vectorised {vec * 1e3:.1f} ms", "ratio": f"{loop / vec:.0f}x faster",
            "loop_s": loop, "vec_s": vec}


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _naive_logprobs(logits, targets, temp):
    z = logits.float() / temp.unsqueeze(-1)  # (N, V) fp32 copy
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _memory_child(impl: str, n: int, v: int, chunk: int) -> dict:
    torch.manual_seed(0)
    small = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)  # warm up kernels
    for fn in (_naive_logprobs, lambda lg, tg, tp: logprobs_and_entropy(lg, tg, tp, chunk_size=4)):
        lp, ent = fn(small, torch.zeros(8, dtype=torch.long), torch.ones(8))
        (lp.sum() + ent.sum()).backward()
    logits = torch.randn(n, v, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,))
    temp = torch.full((n,), 0.9)
    base = _rss_kb()
    t0 = time.perf_counter()
    if impl == "naive":
        lp, ent = _naive_logprobs(logits, targets, temp)
    else:
        lp, ent = logprobs_and_entropy(logits, targets, temp, chunk_size=chunk)
    (lp.sum() + 0.01 * ent.sum()).backward()
    return {"base_kb": base, "seconds": time.perf_counter() - t0}


def _run_memory_case(impl: str, n: int, v: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--n-tokens", str(n), "--vocab", str(v),
           "--chunk-size", str(chunk)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {impl} failed with code {proc.returncode}")
    info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return {"extra_gb": (info["peak_kb"] - info["base_kb"]) / 2**20, "seconds": info["seconds"]}


def bench_memory(n: int, v: int, chunk: int) -> dict:
    naive = _run_memory_case("naive", n, v, chunk)
    ours = _run_memory_case("chunked", n, v, chunk)
    return {"bench": f"logp+entropy fwd+bwd N={n} V={v} bf16 (chunk {chunk})",
            "baseline": f"naive +{naive['extra_gb']:.2f} GB, {naive['seconds']:.1f} s",
            "ours": f"chunked +{ours['extra_gb']:.2f} GB, {ours['seconds']:.1f} s",
            "ratio": f"{naive['extra_gb'] / max(ours['extra_gb'], 1e-9):.1f}x less memory",
            "naive_gb": naive["extra_gb"], "chunked_gb": ours["extra_gb"]}


def _print_table(rows: list[dict]) -> None:
    cols = ("bench", "baseline", "ours", "ratio")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="hapo_cli.algo benchmarks")
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*(str(r[c]) for c in cols))
        Console().print(table)
    except ImportError:  # pragma: no cover
        for r in rows:
            print(" | ".join(str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=V_QWEN)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args([] if argv is None else argv)
    if args.child:
        info = _memory_child(args.child, args.n_tokens, args.vocab, args.chunk_size)
        import resource

        info["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(info))
        return []
    torch.manual_seed(0)
    if args.quick:
        b, t, n, v = 64, 256, 256, 8192
    else:
        b, t, n, v = 512, 2048, args.n_tokens, args.vocab
    rows = [
        bench_loss(b, t, args.device, args.repeats),
        bench_advantages(4096, 16, 1024 if not args.quick else 64, 3),
        bench_memory(n, v, args.chunk_size),
    ]
    _print_table(rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
