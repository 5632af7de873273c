"""Per-rank memory and step time of the learner's update, DDP vs FSDP2 vs DeepSpeed ZeRO-2 and
ZeRO-3, 2 processes (gloo on CPU, NCCL on GPUs), on a model with a large vocabulary: Qwen2 hidden
1536, vocab 151,936 (the Qwen2.5-1.5B head, tied embeddings), 1 decoder layer by default.

Each strategy runs in its own `torchrun`. Start-up is the learner's own (`Strategy.load_policy`
from a policy folder written first: FSDP2 reads each rank's slices of the safetensors, ZeRO-3
builds the model inside `deepspeed.zero.Init` as recipes/accelerate/zero3.yaml's zero3_init_flag
asks, DDP/ZeRO-2 load the whole model) plus `Strategy.prepare`, with the vLLM engine (no engine
copy; `--engine hf` adds the HF engine's unsharded copy under FSDP2/ZeRO-3). Then `--steps`
updates after one warm-up step: fused log-probs (`response_logprobs`), backward over 2
micro-batches, clip, AdamW step. Per rank, on CPU (the kernel's high-water mark VmHWM, reset
with /proc/self/clear_refs at each phase; CUDA: peak allocated):

- start-up peak; resident: RSS after the warm-up step (model states without gradients, the
  process itself: ~340 MB of imports, ~470 MB with DeepSpeed); step peak: the training steps'
  own peak; temporaries: step peak - resident (gradients, activations, gathered parameters,
  communication buffers, optimizer-step temporaries);
- states: the distinct storages held for the model's training state at the end of a step
  (parameters or this rank's shard/partition, `.grad`, the optimizer's state; DeepSpeed's fp32
  master and gradient partitions are counted under optim); engine: the HF engine's copy.

    python bench/bench_strategy.py [--hidden 1536] [--vocab 151936] [--layers 1] [--steps 3]
        [--engine vllm|hf] [--kinds ddp,fsdp2,zero2,zero3,zero3-zinit,fsdp2-before,zero3-before,zero3-tied-only] [--chunk-size 1024]

Measured in one run before the two step-peak fixes further down (their table has the step
peaks now: FSDP2 0.65x, ZeRO-3 0.69x) (2 CPU cores shared with other jobs, load ~3-5; 258 M parameters, fp32,
4 x 128 tokens per rank, --steps 2), MB, rank 0 / rank 1; load: the peak of `load_policy` alone
(DDP's is low because transformers maps the safetensors lazily: the pages are read at prepare):

| strategy        | load       | start-up   | resident   | step peak (vs DDP)    | states (vs DDP) |
| --------------- | ---------- | ---------- | ---------- | --------------------- | --------------- |
| DDP             | 359 359    | 2325 2325  | 4357 4445  | 7225 7218             | 3933            |
| FSDP2           | 1351 1346  | 1351 1346  | 1979 1973  | 5386 5392 (0.75 0.75) | 1967 (0.50)     |
| ZeRO-2          | 485 485    | 2499 2499  | 3090 3106  | 5764 5956 (0.80 0.83) | 3348 (0.85)     |
| ZeRO-3          | 1475 1470  | 3833 3833  | 2868 2906  | 5621 5659 (0.78 0.78) | 1967 (0.50)     |

The ZeRO-3 start-up before and after, side by side in a second run (`--kinds
ddp,zero3,zero3-zinit`; the same step peaks, 0.78-0.79x of DDP's 7196 / 7216):

| ZeRO-3 start-up                       | load                    | start-up   | step peak  |
| ------------------------------------- | ----------------------- | ---------- | ---------- |
| sharded (`load_policy_zero3`)         | 1475 1470 (0.46 0.45)   | 3833 3833  | 5685 5612  |
| `from_pretrained` inside `zero.Init`  | 3201 3245               | 3931 3930  | 5663 5667  |

ZeRO-3 before this bench's fixes: states 2458 (0.63x), step peak 6182 6067 (0.86 0.84x).
- **Shared fp32 masters:** DeepSpeed keeps an fp32 master partition beside the fp32 parameter
  partition, though it means not to (`share_fp32_masters` in hapo_cli/learner/zero_memory.py: its
  same-dtype check compares a device with a str). Sharing them gives 0.50x.
- **Sharded start-up:** each rank fills only its partitions from the safetensors
  (`load_policy_zero3`): load peak 0.46x of `from_pretrained` inside `zero.Init` (rank 0 reads the
  whole state dict; every parameter is gathered in full on every rank to be filled). The start-up
  peak after `prepare` is DeepSpeed's optimizer set-up (a flat copy of the partitions, the fp32
  masters before they are shared, and a step with zero gradients that creates Adam's moments),
  2.9 GB over the 0.5 GB partition and the libraries, the same either way.
- **Earlier:** FSDP2 reduce-scatters every micro-batch (it kept the whole model's unsharded
  gradients from one micro-batch to the next: ~1 GB here), and DeepSpeed's buckets are sized
  from hidden_size where the config leaves them out (DeepSpeed's default 5e8-element reduce
  bucket is a 2 GB fp32 buffer). The whole-process peaks were FSDP2 0.80x, ZeRO-2 0.82x,
  ZeRO-3 0.99x before those.

The two step-peak fixes, side by side in one run (`--kinds ddp,fsdp2-before,fsdp2,
zero3-before,zero3-tied-only,zero3 --steps 2`, 2 cores otherwise idle), MB rank 0 / rank 1:

| strategy                              | step peak (vs DDP)     | temporaries | gloo rs copy | step s (vs DDP) |
| ------------------------------------- | ---------------------- | ----------- | ------------ | --------------- |
| DDP                                   | 7218 7174              | 2732 2811   | 0            | 28.4            |
| FSDP2 before                          | 5224 5270 (0.72 0.73)  | 3218 3275   | 1335         | 36.4 (1.28)     |
| FSDP2                                 | 4676 4635 (0.65 0.65)  | 2725 2627   | 448          | 37.2 (1.31)     |
| ZeRO-3 before                         | 5704 5677 (0.79 0.79)  | 2708 2787   | 1335         | 29.3 (1.03)     |
| ZeRO-3, tied gradient only            | 5732 5677 (0.79 0.79)  | 2695 2696   | 1335 1277    | 27.6 (0.97)     |
| ZeRO-3 (tied gradient + slices)       | 4980 4954 (0.69 0.69)  | 2107 2046   | 448 445      | 25.8 (0.91)     |

- **Tied gradient** (hapo_cli/learner/tied_grad.py, on the learner's fused path): the token
  lookup's gradient is added into the LM head's (same tied weight) in place, instead of
  autograd's dense (V, d) lookup gradient added into it; the same sums bit for bit.
- **Slices** (hapo_cli/learner/gloo_reduce.py): gloo's reduce-scatter copies its whole input
  beside it (the "gloo rs copy" column: what reducing the largest gradient allocates, measured
  in the same processes after the steps, as each kind reduces it); in slices of 32 MB it
  allocates 448 MB instead of 1335. ZeRO-3: DeepSpeed's reduce-scatter function wrapped; FSDP2:
  torch's `set_custom_reduce_scatter`. NCCL reduces in place and keeps its own call.
- **Both are needed:** measured inside the step (VmHWM around each DeepSpeed reduce-scatter,
  `--steps 1`), ZeRO-3's peak came just before the embedding's reduce, at the resident size
  then plus one embedding-sized tensor (the lookup's gradient), and the gloo copy in the reduce
  reached the same height: slices alone gave 5607 / 5718 (vs 5460 / 5665 in that run), the tied
  gradient alone the "tied only" row. An earlier note here said 0.55x / 0.58x "less the copy";
  that was arithmetic, and wrong for ZeRO-3 until the lookup's gradient went too.

Where the rest goes: the tied 151,936 x 1536 embedding is 90 % of the parameters (933 MB fp32).
Every strategy computes its full gradient on every rank (the fused LM-head backward's (V, d)
accumulator; before the tied-gradient fix also the lookup's own dense gradient), and FSDP2/ZeRO-3
gather the full weight for the forward and backward: the temporaries (~2.0-2.7 GB now) are
about 2-3 embedding-sized tensors, and no sharding of whole parameters removes them
(that needs the vocabulary split across ranks, tensor parallelism). A sparse embedding gradient
(nn.Embedding(sparse=True)) had not lowered ZeRO-3's peak (5660 / 5596): autograd adds a sparse
gradient into the head's dense one into a new dense tensor (it accumulates in place only dense
into dense), which the tied-gradient fix avoids by adding the rows itself. DDP's peak is the AdamW step (gradients + foreach temporaries on
top of 4.4 GB resident). FSDP2's step time doubles here: a reduce-scatter per micro-batch and
gathers over gloo on 2 busy cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"ddp": "DDP", "fsdp2": "FSDP2", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
         "zero3-zinit": "ZeRO-3 (zero.Init load)", "fsdp2-before": "FSDP2 before",
         "zero3-before": "ZeRO-3 before", "zero3-tied-only": "ZeRO-3 tied only"}


def _status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now; VmHWM: the peak since `_reset_peak`)."""
    kb = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
    return int(kb) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS


def _storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor's local shard; each storage
    once across calls sharing `seen`: DeepSpeed's parameters are views of its flat buffers)."""
    import torch

    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def _tensors_of(obj, depth: int = 2):
    """Tensors held by `obj`'s attributes (and lists/dicts of them), `depth` levels down."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_of(v, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v, depth - 1)


def model_state_bytes(model, optimizer) -> dict[str, int]:
    """What this rank holds for the model's training state: parameters (the local shard; under
    ZeRO-3 the partition), their gradients, and the optimizer (its state, and DeepSpeed's own
    fp32 master partitions and gradient partitions/buckets), each storage counted once."""
    params = list(model.parameters())
    seen: set[int] = set()
    out = {"params": _storage_bytes([getattr(p, "ds_tensor", p) for p in params], seen)}
    out["grads"] = _storage_bytes([p.grad for p in params if p.grad is not None], seen)
    inner, ds = optimizer, []
    while hasattr(inner, "optimizer"):  # accelerate's wrapper > DeepSpeed's ZeRO optimizer
        inner = inner.optimizer
        if hasattr(inner, "optimizer") and type(inner).__module__.startswith("deepspeed"):
            ds.append(inner)
    masters_and_grads = [t for o in ds for v in vars(o).values() for t in _tensors_of(v)]
    out["grads"] += _storage_bytes([t for o in ds for t in _tensors_of(
        getattr(o, "averaged_gradients", {}))], seen)
    out["optimizer"] = _storage_bytes(
        [t for s in inner.state.values() for t in s.values()], seen)
    out["optimizer"] += _storage_bytes(masters_and_grads, seen)
    return out


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from hapo_cli.learner.forward import response_logprobs
    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.strategy import Strategy, build_accelerator

    torch.set_num_threads(1)
    base = args.kind.split("-")[0]
    os.environ["ACCELERATE_USE_FSDP"] = "true" if base == "fsdp2" else "false"
    os.environ["FSDP_VERSION"] = "2"
    stage = {"zero2": "2", "zero3": "3"}.get(base)
    from hapo_cli.learner import forward, gloo_reduce

    if args.kind.endswith(("-before", "-tied-only")):  # gloo's reduce-scatter in one call
        gloo_reduce._is_gloo = lambda group: False
    if args.kind.endswith("-before"):  # the tied embedding's dense lookup gradient
        forward.plain_tied_embedding = lambda model, head: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if stage else "false"
    if stage:  # what `accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml` sets
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = stage
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "true" if stage == "3" else "false"
    cuda = torch.cuda.is_available()

    def peak_mb() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")

    def now_mb() -> float:
        return torch.cuda.memory_allocated() / 2**20 if cuda else _status_mb("VmRSS")

    def reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    row: dict = {"kind": args.kind, "base_mb": now_mb()}  # imports only
    reset()
    t0 = time.perf_counter()
    precision = resolve_precision(args.dtype, "no")
    acc, kind = build_accelerator(precision)
    strategy = Strategy(kind, acc, precision)
    if args.kind == "zero3-zinit":  # the start-up before the sharded one: from_pretrained
        from hapo_cli.model_dirs import load_policy  # inside zero.Init (the fallback's path)

        model = load_policy(Path(args.policy), strategy.load_dtype)[0]
    else:
        model, _tok = strategy.load_policy(Path(args.policy))  # the learner's own start-up
    row["load_mb"] = peak_mb()
    model.train()
    model, opt = strategy.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-6),
                                  engine=args.engine, micro_batch_size=args.batch // 2)
    row["startup_mb"], row["startup_s"] = peak_mb(), time.perf_counter() - t0
    world, rank = acc.num_processes, acc.process_index
    g = torch.Generator().manual_seed(rank)
    P, T, B = args.prompt_len, args.response_len, args.batch
    ids = torch.randint(0, args.vocab, (B, P + T), generator=g).to(acc.device)
    am = torch.ones_like(ids)
    micros = [slice(0, B // 2), slice(B // 2, B)]
    times = []
    for step in range(args.steps + 1):
        if step == 1:  # after the warm-up step (the optimizer state exists from here on)
            row["resident_mb"] = now_mb()
            reset()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, mr in enumerate(micros):
            with strategy.micro_batch(i, len(micros)):
                logp, _ = response_logprobs(model, ids[mr], am[mr], T, None, fused=True,
                                            chunk_size=args.chunk_size, entropy=False)
                strategy.backward(-logp.mean() / len(micros))
        strategy.clip_and_step(1.0)
        if step == args.steps:  # gradients are still held here (zero_grad frees them)
            row["states"] = model_state_bytes(model, opt)
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row["step_mb"] = peak_mb()
    import torch.distributed as dist

    row["gloo_rs_mb"] = 0.0
    if not cuda and base in ("fsdp2", "zero3"):
        # what gloo's reduce-scatter (FSDP2's and ZeRO-3's gradient reduction) allocates
        # beside its input, for the largest parameter's gradient, as this kind reduces it (in
        # slices, or one call): NCCL reduces in place
        n = max(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        x, out = torch.ones(n), torch.empty(n // world)
        before = now_mb()
        reset()
        if gloo_reduce._is_gloo(None):
            gloo_reduce.reduce_scatter_in_slices(
                lambda o, i: dist.reduce_scatter_single(output=o, input=i), out, x,
                rank=rank, world=world)
        else:
            dist.reduce_scatter_single(output=out, input=x)
        row["gloo_rs_mb"] = peak_mb() - before
        del x, out
    engine = strategy._engine_model
    row["engine_mb"] = (0.0 if engine is None else
                        _storage_bytes(list(engine.parameters()), set()) / 2**20)
    desc = strategy.describe()
    row.update(rank=rank, world=world, step_s=statistics.median(times[1:]),
               num_parameters=desc["num_parameters"], device=acc.device.type)
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():
        dist.destroy_process_group()


def run(kind: str, args, tmp: Path) -> list[dict]:
    out = tmp / kind
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.nproc), __file__, "--worker", "--kind", kind, "--out", str(out)]
    for k in ("policy", "vocab", "engine", "chunk_size", "steps", "batch", "prompt_len", "response_len",
              "dtype"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{kind}: the 2-process run failed:\n{done.stderr[-6000:]}")
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(args.nproc)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--kind", default="ddp")
    p.add_argument("--out", default="")
    p.add_argument("--policy", default="")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="responses per rank (2 micro-batches)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--chunk-size", type=int, default=1024, help="fused log-prob chunk (tokens)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"],
                   help="hf: sharded strategies keep the HF engine's unsharded copy")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--kinds", default="ddp,fsdp2,zero2,zero3,zero3-zinit")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    from rich.console import Console
    from rich.table import Table

    kinds = args.kinds.split(",")
    if importlib.util.find_spec("deepspeed") is None:
        kinds = [k for k in kinds if not k.startswith("zero")]
        print("deepspeed not installed: the ZeRO rows are skipped (pip install -e '.[deepspeed]')")
    sys.path.insert(0, str(ROOT))
    from bench.bench_checkpoint import write_policy  # the checkpoint bench's policy folder

    with tempfile.TemporaryDirectory() as tmp:
        args.policy = str(Path(tmp) / "policy")
        write_policy(args)
        res = {k: run(k, args, Path(tmp)) for k in kinds}
    ref = res[kinds[0]]
    n = ref[0]["num_parameters"]
    unit = "MB allocated" if ref[0]["device"] == "cuda" else "MB resident (VmHWM / VmRSS)"
    table = Table(title=f"learner update, {args.nproc} processes, Qwen2 hidden {args.hidden}, "
                        f"vocab {args.vocab}, {args.layers} layer(s), {n / 1e6:.0f} M parameters, "
                        f"{args.dtype} compute, fp32 masters, engine {args.engine} "
                        f"({ref[0]['device']}; {unit}; ratios vs {NAMES[kinds[0]]})")
    for col in ("strategy", "rank", "load peak", "start-up peak", "resident", "step peak", "vs",
                "states", "vs ", "params", "grads", "optim", "temporaries", "gloo rs copy",
                "engine", "step s", " vs"):
        table.add_column(col, justify="right")
    rows = []
    for kind in kinds:
        for d, r in zip(ref, res[kind]):
            st = {k: v / 2**20 for k, v in r["states"].items()}
            states = sum(st.values())
            d_states = sum(d["states"].values()) / 2**20
            row = {"strategy": kind, "rank": r["rank"], "load_mb": r["load_mb"],
                   "startup_mb": r["startup_mb"],
                   "resident_mb": r["resident_mb"], "step_mb": r["step_mb"],
                   "states_mb": states, **{f"{k}_mb": v for k, v in st.items()},
                   "temporaries_mb": r["step_mb"] - r["resident_mb"],
                   "gloo_rs_mb": r["gloo_rs_mb"],
                   "engine_mb": r["engine_mb"], "step_s": r["step_s"]}
            rows.append(row)
            table.add_row(NAMES[kind], str(r["rank"]), f"{r['load_mb']:.0f}",
                          f"{r['startup_mb']:.0f}",
                          f"{r['resident_mb']:.0f}", f"{r['step_mb']:.0f}",
                          f"{r['step_mb'] / d['step_mb']:.2f}", f"{states:.0f}",
                          f"{states / d_states:.2f}", f"{st['params']:.0f}", f"{st['grads']:.0f}",
                          f"{st['optimizer']:.0f}", f"{row['temporaries_mb']:.0f}",
                          f"{r['gloo_rs_mb']:.0f}",
                          f"{r['engine_mb']:.0f}", f"{r['step_s']:.1f}",
                          f"{r['step_s'] / d['step_s']:.2f}")
    Console(width=200).print(table)
    return rows


if __name__ == "__main__":
    main()
