"""Peak memory and time of chunked (fused) vs naive log-probs + entropy, forward + backward.

Each case runs in its own subprocess so that peak memory is not polluted by the other cases:
the child warms up torch's kernels on a tiny problem, allocates the inputs (hidden (N, d) and
the LM head W (V, d), both requiring grad), records its resident set size (RSS), then runs
``loss = sum(a * logp + b * entropy); loss.backward()`` once and exits. The parent reads the
child's peak RSS (``ru_maxrss`` from ``os.wait4``) and reports

    peak extra memory = peak RSS - RSS after allocating the inputs

(this includes W.grad, which both paths produce) and the wall time of forward + backward.

The naive path is the plain formula a learner would write (no temperature, so it makes no
extra (N, V) copy for the division): ``z = (h @ W.T).float(); logp_all = z.log_softmax(-1);
logp = gather; entropy = -(logp_all.exp() * logp_all).sum(-1)``.

Default size: N = 4096 tokens, d = 1536, V = 151,936 (Qwen2.5-1.5B's head). The issue's
N = 8192 (``--n-tokens 8192``) needs ~24 GB for the naive float32 case (11.9 GB measured at
N = 4096, linear in N), more than a 24 GiB machine has free, so the default halves N. Memory
and time both scale linearly in N for naive (peak ~ N * V); the fused peak ~ chunk * V + V * d
hardly depends on N, so the fused/naive memory ratio at N = 8192 is about half the one at 4096.
Measured at the default (2 cores, shared with other jobs, load average ~9, so absolute times
are inflated; ratios are what to read): fp32 naive 11880 MB / 231 s, fused 2105 MB / 211 s
(ratios 0.18, 0.91); bf16 naive 11871 MB / 94 s, fused 2129 MB / 81 s (0.18, 0.86). Matmul
alone predicts ~45 s + ~60 s + ~20 s + ~25 s on an idle 2-core machine (fp32 ~120 GFLOP/s,
bf16 ~330 GFLOP/s with AVX512-BF16).

    python bench/bench_fused.py [--n-tokens 4096] [--chunk-size 1024] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _naive(hidden, weight, targets):
    import torch  # noqa: F401  (child process only)

    z = (hidden @ weight.T).float()  # (N, V)
    logp_all = z.log_softmax(-1)  # (N, V)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


def _run_child(impl: str, dtype_name: str, n: int, d: int, v: int, chunk_size: int) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from hapo_cli.algo.fused import fused_logprobs_and_entropy

    dtype = getattr(torch, DTYPES[dtype_name])

    def step(hidden, weight, targets, a, b):
        if impl == "fused":
            logp, entropy = fused_logprobs_and_entropy(hidden, weight, targets, None, chunk_size)
        else:
            logp, entropy = _naive(hidden, weight, targets)
        (a * logp + b * entropy).sum().backward()

    # warm up kernels (oneDNN, autograd) on a tiny problem so their setup is not "extra"
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(64, 32, dtype=dtype, requires_grad=True),
             torch.randn(500, 32, dtype=dtype, requires_grad=True)]
    step(*small, torch.randint(0, 500, (64,)), torch.randn(64), torch.randn(64))
    del small

    # inputs, drawn directly in their dtype (no float32 temporary to raise the peak early)
    hidden = torch.randn(n, d, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(v, d, dtype=dtype, generator=g).mul_(0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    baseline_kb = _current_rss_kb()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    step(hidden, weight, targets, a, b)
    elapsed = time.perf_counter() - t0
    return {"baseline_kb": baseline_kb, "maxrss_before_kb": maxrss_before_kb, "time_s": elapsed}


def _measure(impl: str, dtype_name: str, n: int, d: int, v: int, chunk_size: int) -> dict:
    """Run one case in a fresh subprocess; its peak RSS comes from os.wait4."""
    cmd = [
        sys.executable, __file__, "--child", impl, "--dtypes", dtype_name, "--n-tokens", str(n),
        "--hidden", str(d), "--vocab", str(v), "--chunk-size", str(chunk_size),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode < 0 else err.strip()[-500:]
        return {"impl": impl, "dtype": dtype_name, "n_tokens": n, "chunk_size": chunk_size,
                "peak_extra_mb": float("nan"), "time_s": float("nan"), "error": reason}
    child = json.loads(out.strip().splitlines()[-1])
    if child["maxrss_before_kb"] > child["baseline_kb"] * 1.05 + 50_000:
        print(f"warning: {impl}/{dtype_name} peaked before the measured step", file=sys.stderr)
    return {
        "impl": impl, "dtype": dtype_name, "n_tokens": n,
        "chunk_size": chunk_size if impl == "fused" else None,
        "peak_extra_mb": (usage.ru_maxrss - child["baseline_kb"]) / 1024,
        "time_s": child["time_s"],
    }


def _table(rows: list[dict]) -> str:
    lines = [f"{'dtype':<6}{'impl':<7}{'N':>7}{'chunk':>7}{'peak extra MB':>15}{'time s':>9}"
             f"{'mem ratio':>11}{'time ratio':>12}"]
    naive = {r["dtype"]: r for r in rows if r["impl"] == "naive"}
    for r in rows:
        base = naive.get(r["dtype"])
        ratios = ""
        if r["impl"] == "fused" and base is not None:
            ratios = (f"{r['peak_extra_mb'] / base['peak_extra_mb']:>11.3f}"
                      f"{r['time_s'] / base['time_s']:>12.3f}")
        chunk = "-" if r["chunk_size"] is None else str(r["chunk_size"])
        lines.append(f"{r['dtype']:<6}{r['impl']:<7}{r['n_tokens']:>7}{chunk:>7}"
                     f"{r['peak_extra_mb']:>15.0f}{r['time_s']:>9.2f}{ratios}"
                     + (f"  ERROR: {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print a table and return one dict per (dtype, impl) case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--impls", nargs="+", choices=["naive", "fused"],
                        default=["naive", "fused"])
    parser.add_argument("--child", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = _run_child(args.child, args.dtypes[0], args.n_tokens, args.hidden, args.vocab,
                            args.chunk_size)
        print(json.dumps(result))
        return [result]
    rows = []
    for dtype_name in args.dtypes:
        for impl in args.impls:
            rows.append(_measure(impl, dtype_name, args.n_tokens, args.hidden, args.vocab,
                                 args.chunk_size))
            print(f"done: {dtype_name} {impl}", file=sys.stderr, flush=True)
    print(f"fused vs naive log-probs + entropy, forward + backward, d={args.hidden}, "
          f"V={args.vocab} (goal: mem ratio <= 0.25, time ratio <= 1.3)")
    print(_table(rows))
    return rows


if __name__ == "__main__":
    main()
