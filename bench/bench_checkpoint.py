"""Per-rank host memory of checkpoints and start-up, and the training time a save costs: the HF
format (log.checkpoint_format=hf: the gathered HF folder + optimizer.pt) vs DCP shards (dcp,
sync and async), FSDP2 and DeepSpeed ZeRO-3, 2 processes, on the large-vocabulary model of
bench_strategy.py (Qwen2 hidden 1536, vocab 151,936, 1 layer: 258 M parameters, fp32 masters).

Each (strategy, format) runs two `torchrun`s: a *training* one (start-up from the policy
folder, 3 AdamW steps on 2 x 32 tokens per rank, then the format's save(s)) and a *resume*
one (start-up + restoring model and optimizer from that checkpoint, as `--resume` does).
Peaks are the kernel's own high-water mark of resident memory (VmHWM), reset with
`/proc/self/clear_refs` at the start of each phase, so each phase's peak is its own (an
asynchronous write's thread shares the process). The training time a save costs, two ways:
*blocked*, the training thread's time in checkpoint code (the save call + the wait at the next
optimizer step for the save to stop reading the live tensors); *lost*, (the save call + the
training steps taken until its write is on disk) minus as many median steps, which adds what
the writer's threads slow training by (on a CPU-only machine they compete for the same cores).
DCP saves three ways: sync; async (the CPU default: no copy, the next optimizer step waits for
the write); async copy (DCP's DefaultStager copies in its own thread, the next step waits for
the copy: the accelerator default).

    python bench/bench_checkpoint.py [--hidden 1536] [--vocab 151936] [--layers 1]

Start-up: `hf` rows load the policy as before this bench's change (every rank
`from_pretrained`s the full fp32 model, then shards it); `dcp` rows use the sharded start-up
(FSDP2: each rank reads only its slices of the safetensors, `learner/sharded_load.py`).
ZeRO-3 (DCP cannot address DeepSpeed's flat partitions): `hf` is the HF folder gathered on
rank 0 + one optimizer partition per rank, its start-up `from_pretrained` inside
`deepspeed.zero.Init` (recipes/accelerate/zero3.yaml's zero3_init_flag); `dcp` is what
log.checkpoint_format=dcp writes under DeepSpeed, its own per-rank files
(`learner/zero_checkpoint.py`, sync and async), after the sharded start-up.

Measured in one run (2 CPU cores shared with ~7 other jobs, load 5-19 during it: a training
step took 46 s; 258 M parameters), rank 0, MB: FSDP2 hf: start-up 2324, save 6479,
resume 5185; FSDP2 dcp: start-up 1344 (0.58x), sync save 1984 (0.31x), async save 4790 (0.74x:
the training step's own peak, 4828, no copy), async copy 6296 (0.97x: + the 1.5 GB staged copy),
resume 2757 (0.53x: Adam's state preallocated, no zero-gradient step). Blocked: hf 69.7 s, dcp
sync 6.32 s, async 0.04 s (0.006x sync), async copy 0.02 s (0.003x); neither async waited at the
next optimizer step (a write takes ~6 s, a sync save 6.3 s, of a 46 s step). Lost: dcp sync 6.32 s, async 1.62 s
(0.26x: the writer slowed the step beside it), async copy -0.93 s (below the +-1-2 s noise of
the steps). ZeRO-3 (own format): start-up 3875, train 7289, save 6203, resume 3884, lost 16.3 s.

A later run, `--kinds zero3` (2 cores otherwise idle, a step 9.7 s), rank 0: hf start-up 3915,
save 4746 (the shared fp32 masters took it from 6203), resume 3948; per rank: start-up 3833,
save sync 2846 (0.60x), async 5572 (the step beside the write), resume 3833 (the start-up; the
memory-mapped load itself 2146). Blocked: hf 5.94 s, sync 1.97 s, async 0.05 s (0.03x);
lost async 2.83 s (1.44x: both ranks' writers compete with both ranks' step on 2 cores).
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
NAMES = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}


def _hwm_mb() -> float:
    """This process's peak resident memory since the last `_reset_peak` (MiB)."""
    kb = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
    return int(kb) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS


def write_policy(args) -> None:
    """The policy folder (fp32 safetensors + a tokenizer) every worker starts from."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT))
    from hapo_cli.models import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=args.intermediate, tie_word_embeddings=True,
                      max_position_embeddings=1024)
    Qwen2ForCausalLM(cfg).save_pretrained(args.policy, safe_serialization=True)
    build_tokenizer().save_pretrained(args.policy)


class _Stream:  # the data stream's place in a checkpoint (write_trainer_files)
    def state_dict(self) -> dict:
        return {}


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from hapo_cli.learner.forward import response_logprobs
    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.state import LoopState
    from hapo_cli.learner.strategy import Strategy, build_accelerator

    torch.set_num_threads(1)
    os.environ["ACCELERATE_USE_FSDP"] = "true" if args.kind == "fsdp2" else "false"
    os.environ["FSDP_VERSION"] = "2"
    zero3 = args.kind == "zero3"
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if zero3 else "false"
    if zero3:  # what `accelerate launch --config_file recipes/accelerate/zero3.yaml` sets
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = "3"
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "true"
    out: dict = {"kind": args.kind, "fmt": args.fmt, "role": args.role}
    _reset_peak()
    precision = resolve_precision("float32", "no")
    acc, kind = build_accelerator(precision)
    strategy = Strategy(kind, acc, precision)
    ckpt = Path(args.run) / "checkpoints" / "step-000003"
    hf_resume = args.role == "resume" and args.fmt == "hf"
    source = ckpt if hf_resume else Path(args.policy)  # the old resume reloads the HF folder
    t0 = time.perf_counter()
    if args.fmt == "hf":  # before: every rank loads the full model (zero.Init under ZeRO-3)
        from hapo_cli.model_dirs import load_policy

        with strategy.loading():
            model, tok = load_policy(source, strategy.load_dtype)
    else:
        model, tok = strategy.load_policy(source)
    model.train()
    model, opt = strategy.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-6),
                                  engine="vllm", micro_batch_size=2)
    out["startup_s"] = time.perf_counter() - t0
    out["startup_mb"] = _hwm_mb()
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.zeros(1)]), lambda s: 1.0)
    if args.role == "resume":
        _reset_peak()
        t0 = time.perf_counter()
        if args.fmt == "hf":  # FSDP2: the whole optimizer.pt on every rank
            strategy.load_checkpoint_optimizer(ckpt)
        elif zero3:  # DeepSpeed's own: each rank its partition
            from hapo_cli.learner import zero_checkpoint

            zero_checkpoint.load_into_strategy(ckpt, strategy)
        else:
            from hapo_cli.learner.dcp_checkpoint import load_into_strategy

            load_into_strategy(ckpt, strategy)
        out["load_s"] = time.perf_counter() - t0
        out["load_mb"] = _hwm_mb()
        out["resume_mb"] = max(out["startup_mb"], out["load_mb"])
        _dump(args, acc, out)
        return

    g = torch.Generator().manual_seed(acc.process_index)
    P, T, B = 8, 24, 2
    ids = torch.randint(0, args.vocab, (B, P + T), generator=g).to(acc.device)
    am = torch.ones_like(ids)

    def step() -> float:
        t = time.perf_counter()
        with strategy.micro_batch(0, 1):
            logp, _ = response_logprobs(model, ids, am, T, None, fused=True, chunk_size=1024,
                                        entropy=False)
            strategy.backward(-logp.mean())
        strategy.clip_and_step(1.0)
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    _reset_peak()
    times = [step() for _ in range(3)]
    out["train_mb"] = _hwm_mb()
    med = statistics.median(times[1:])
    out["step_s"] = med
    state = LoopState(step=3)

    def small(folder: Path) -> None:
        from hapo_cli.learner.checkpoint import write_trainer_files
        from hapo_cli.learner.dcp_checkpoint import write_config_files

        write_trainer_files(folder, Path(args.run), 3, sched, _Stream(), state,
                            format="zero" if zero3 else "dcp")
        write_config_files(folder, model, tok)

    # the asynchronous ones last, at steps 4 and 5: the resume reads step 3 (the sync one)
    modes = (["sync"] if args.fmt == "hf" else ["sync", "async"] if zero3
             else ["sync", "async", "async_copy"])
    for i, mode in enumerate(modes):
        acc.wait_for_everyone()
        _reset_peak()
        t0 = time.perf_counter()
        steps, waited = 0, 0.0
        if args.fmt == "hf":
            from hapo_cli.learner.loop import save_hf_checkpoint

            save_hf_checkpoint(strategy, model, opt, Path(args.run), 3, tok, sched, _Stream(),
                               state, keep=5)
            stall = time.perf_counter() - t0
        else:
            from hapo_cli.learner.dcp_checkpoint import Checkpointer
            from hapo_cli.learner.zero_checkpoint import ZeroCheckpointer

            # async: no copy, the next optimizer step waits for the write (the CPU default);
            # async_copy: DCP's staging thread copies, the next step waits for the copy;
            # ZeRO-3: DeepSpeed's engine.save_checkpoint, each rank its partition
            saver = (ZeroCheckpointer(Path(args.run), strategy, keep=5,
                                      async_save=mode != "sync") if zero3 else
                     Checkpointer(Path(args.run), acc, keep=5, async_save=mode != "sync",
                                  copy_state=mode == "async_copy"))
            saver.save(3 + i, model, opt, small)
            stall = time.perf_counter() - t0
            if mode != "sync":  # train on while the write runs (steps agree across ranks)
                import torch.distributed as dist

                while True:
                    step()
                    steps += 1
                    done = torch.tensor([int(saver._pending.done())])
                    dist.all_reduce(done, op=dist.ReduceOp.MIN)
                    if done.item() or steps == 10:
                        break
                waited = saver.last_step_wait_s
            saver.wait()
        total = time.perf_counter() - t0
        out[f"save_{mode}_mb"] = _hwm_mb()
        out[f"save_{mode}_call_s"] = stall
        out[f"save_{mode}_blocked_s"] = stall + waited  # the save call + the next step's wait
        out[f"save_{mode}_steps"] = steps
        out[f"save_{mode}_lost_s"] = total - steps * med
    _dump(args, acc, out)


def _dump(args, acc, out: dict) -> None:
    out["rank"] = acc.process_index
    Path(f"{args.out}.{acc.process_index}.json").write_text(json.dumps(out))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _label(row: dict) -> str:
    """The format column: FSDP2 hf / dcp; ZeRO-3's two (dcp = DeepSpeed's per-rank files)."""
    if row["kind"] == "fsdp2":
        return row["fmt"]
    return "hf + ZeRO parts" if row["fmt"] == "hf" else "ZeRO per rank"


def _run(args, tmp: Path, kind: str, fmt: str, role: str) -> list[dict]:
    out = tmp / f"{kind}-{fmt}-{role}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.nproc), __file__, "--worker", "--bench-kind", kind, "--bench-fmt", fmt,
           "--bench-role", role, "--policy", str(tmp / "policy"),
           "--run-dir", str(tmp / f"run-{kind}-{fmt}"), "--out", str(out),
           "--vocab", str(args.vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env)
    if res.returncode:
        raise RuntimeError(f"{kind}/{fmt}/{role} failed:\n{res.stdout[-3000:]}")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(args.nproc)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--write-policy", action="store_true")
    # worker options (named so that torchrun's own parser does not take them)
    p.add_argument("--bench-kind", dest="kind", default="fsdp2")
    p.add_argument("--bench-fmt", dest="fmt", default="dcp")
    p.add_argument("--bench-role", dest="role", default="train")
    p.add_argument("--policy", default="")
    p.add_argument("--run-dir", dest="run", default="")
    p.add_argument("--out", default="")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--kinds", default="fsdp2,zero3")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    if args.write_policy:
        write_policy(args)
        return []
    from rich.console import Console
    from rich.table import Table

    kinds = args.kinds.split(",")
    if "zero3" in kinds and importlib.util.find_spec("deepspeed") is None:
        print("deepspeed not installed: the ZeRO-3 rows are skipped (pip install -e '.[deepspeed]')")
        kinds.remove("zero3")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--write-policy", "--policy", str(tmp / "policy"),
                        "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--layers",
                        str(args.layers), "--intermediate", str(args.intermediate)], check=True)
        for kind in kinds:
            for fmt in ("hf", "dcp"):
                train = _run(args, tmp, kind, fmt, "train")
                resume = _run(args, tmp, kind, fmt, "resume")
                for t, r in zip(train, resume):
                    rows.append({**t, **{k: v for k, v in r.items() if k.startswith(("load",
                                                                                      "resume"))},
                                 "resume_startup_mb": r["startup_mb"]})
    old0 = {kind: next(r for r in rows if r["kind"] == kind and r["fmt"] == "hf"
                       and r["rank"] == 0) for kind in kinds}
    table = Table(title=f"checkpoints and start-up, {args.nproc} processes, Qwen2 hidden "
                        f"{args.hidden}, vocab {args.vocab}, {args.layers} layer(s), fp32 "
                        "masters + AdamW; host peak RSS per rank (MB), x = / the hf row's rank 0")
    for col in ("strategy", "format", "rank", "start-up", "train", "save sync", "x",
                "save async", "x ", "async copy", "x  ", "resume", "x   ", "step s"):
        table.add_column(col)

    def mb(r, key, o):
        v = r.get(key)
        return ["-", "-"] if v is None else [f"{v:.0f}", f"{v / o:.2f}"]

    for r in rows:
        o = old0[r["kind"]]
        fmt = _label(r)
        table.add_row(NAMES[r["kind"]], fmt, str(r["rank"]), f"{r['startup_mb']:.0f}",
                      f"{r['train_mb']:.0f}", *mb(r, "save_sync_mb", o["save_sync_mb"]),
                      *mb(r, "save_async_mb", o["save_sync_mb"]),
                      *mb(r, "save_async_copy_mb", o["save_sync_mb"]),
                      *mb(r, "resume_mb", o["resume_mb"]), f"{r['step_s']:.2f}")
    Console(width=220).print(table)
    # blocked: the save call + the wait at the next optimizer step (the training thread's
    # time in checkpoint code); lost: the save call + the steps taken until the write is on
    # disk, minus as many median steps (adds what the writer's threads slow training down
    # by, competing for the same cores)
    table = Table(title="training time a save costs (s), per rank; x = / the same rank's sync "
                        "save; async: no copy, the next optimizer step waits for the write; "
                        "async copy: DCP's staging thread copies, the next step waits for the copy")
    for col in ("strategy", "format", "rank", "save", "call", "blocked", "x", "lost", "x ",
                "steps during write"):
        table.add_column(col)
    for r in rows:
        fmt = _label(r)
        for mode in ("sync", "async", "async_copy"):
            if f"save_{mode}_lost_s" not in r:
                continue
            b, lost = r[f"save_{mode}_blocked_s"], r[f"save_{mode}_lost_s"]
            b0, lost0 = r["save_sync_blocked_s"], r["save_sync_lost_s"]
            table.add_row(NAMES[r["kind"]], fmt, str(r["rank"]), mode.replace("_", " "),
                          f"{r[f'save_{mode}_call_s']:.2f}", f"{b:.2f}", f"{b / b0:.2f}",
                          f"{lost:.2f}", f"{lost / lost0:.2f}", str(r[f"save_{mode}_steps"]))
    Console(width=220).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
