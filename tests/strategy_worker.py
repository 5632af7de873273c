"""One optimizer step of the tiny Qwen2 model under each learner strategy (run by torchrun from
tests/test_strategy.py; not collected by pytest). Writes one JSON file per case (rank 0) and the
gathered parameters after the step, so the test compares strategies with each other.

    python -m torch.distributed.run --nproc_per_node 2 tests/strategy_worker.py OUT_DIR KIND:DTYPE ...
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch

DONE = "strategy_worker: every case written,"  # tests/test_strategy.py looks for it


def tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return Qwen2ForCausalLM(cfg)


def batch(rows: int = 8, P: int = 5, T: int = 7):
    """The same global batch on every rank: left-padded prompts | right-padded responses."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(2, 24, (rows, P + T), generator=g)
    am = torch.ones(rows, P + T, dtype=torch.long)
    plen = torch.randint(1, P + 1, (rows,), generator=g)
    rlen = torch.randint(1, T + 1, (rows,), generator=g)
    for i in range(rows):
        am[i, : P - plen[i]] = 0
        am[i, P + rlen[i]:] = 0
    ids = ids.masked_fill(am == 0, 0)
    adv = torch.randn(rows, generator=g)
    return ids, am, T, adv


def zero_partition(engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's ZeRO partition: the fp32 masters (ZeRO-1/2 or ZeRO-3), the Adam moments."""
    zopt = engine.optimizer
    masters = list(getattr(zopt, "single_partition_of_fp32_groups", None)
                   or zopt.fp32_partitioned_groups_flat)
    moments = [v for st in zopt.optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0]
    return masters, moments


def run_case(out: Path, kind: str, dtype: str, lr: float) -> None:
    from accelerate.state import AcceleratorState

    from hapo_cli.learner.forward import response_logprobs, unwrap
    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.strategy import Strategy, build_accelerator
    from hapo_cli.learner.weights import full_named_parameters

    AcceleratorState._reset_state(True)
    os.environ["ACCELERATE_USE_FSDP"] = "true" if kind == "fsdp2" else "false"
    os.environ["FSDP_VERSION"] = "2"
    stage = {"zero2": "2", "zero3": "3"}.get(kind)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if stage else "false"
    if stage:  # what `accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml` sets
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = stage
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "false"
        kind = "deepspeed"
    precision = resolve_precision(dtype, "no")
    acc, got_kind = build_accelerator(precision)
    assert got_kind == kind or (kind == "ddp" and got_kind == "single"), (kind, got_kind)
    strategy = Strategy(got_kind, acc, precision)
    model = tiny_model()
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model, opt = strategy.prepare(
        model, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0), engine="vllm",
        micro_batch_size=2, grad_clip=1e9)  # no clipping: compare raw steps
    world, rank = acc.num_processes, acc.process_index
    if got_kind == "deepspeed":  # the fp32 masters before the step (the module may be bf16)
        masters0 = [t.detach().clone()
                    for t in zero_partition(acc.deepspeed_engine_wrapped.engine)[0]]

    # the gather the rollout engine gets, before any step: the unsharded initial weights
    full0 = {k: v.detach().cpu().clone() for k, v in full_named_parameters(model, acc)}
    gather_diff = max(float((full0[k].float() - ref[k].float()).abs().max()) for k in full0)
    gather_keys_ok = set(full0) == {n for n, _ in unwrap(model).named_parameters()}

    ids, am, T, adv = batch()
    local = ids.shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    ids, am, adv = ids[rows], am[rows], adv[rows]
    mask = am[:, -T:].bool()
    normalizer = float(batch()[1][:, -T:].sum())  # global valid tokens
    micros = [slice(0, local // 2), slice(local // 2, local)]

    def train_step() -> float:
        for i, mr in enumerate(micros):
            with strategy.micro_batch(i, len(micros)):
                logp, _ = response_logprobs(model, ids[mr].to(acc.device),
                                            am[mr].to(acc.device), T, None, fused=True,
                                            chunk_size=16, entropy=False)
                loss = -(logp * adv[mr, None].to(logp.device) * mask[mr].to(logp.device)).sum()
                strategy.backward(loss / normalizer * world)
        return strategy.clip_and_step(1e9)  # no clipping: compare raw steps

    grad_norm = train_step()
    full1 = {k: v.detach().cpu().float().clone() for k, v in full_named_parameters(model, acc)}
    n_all = sum(v.numel() for v in full1.values())
    n_changed = sum(int((full1[k] != ref[k].float()).sum()) for k in full1)
    desc = strategy.describe()

    res = {"kind": got_kind, "dtype": dtype, "world": world, "grad_norm": grad_norm,
           "gather_max_abs_diff": gather_diff, "gather_keys_ok": gather_keys_ok,
           "changed_frac": n_changed / n_all, "total_param_bytes": total_bytes,
           "describe": desc, "local_bytes": [0] * world}
    lb = torch.tensor([desc["param_bytes_per_rank"]], dtype=torch.long)
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.zeros_like(lb) for _ in range(world)]
        dist.all_gather(gathered, lb)
        res["local_bytes"] = [int(x) for x in gathered]
    else:
        res["local_bytes"] = [int(lb)]

    if got_kind == "fsdp2":
        # gathered optimizer state: every rank's shard, not rank 0's; a reload restores each
        # rank's own shard
        from torch.distributed.tensor import DTensor

        name, p = next((n, p) for n, p in unwrap(model).named_parameters()
                       if n.endswith("mlp.down_proj.weight"))
        import torch.distributed as dist

        osd = strategy.optimizer_state()  # the full state on rank 0 (what a checkpoint saves)
        mine = opt.state[p]["exp_avg"]
        assert isinstance(mine, DTensor)
        gathered = mine.full_tensor().cpu()
        if rank == 0:
            full_avg = osd["state"][name]["exp_avg"]
            res["optim_full_vs_gathered"] = float((full_avg - gathered).abs().max())
            res["optim_full_shape"] = list(full_avg.shape)
            torch.save(osd, out / "optim.pt")
        dist.barrier()
        osd = torch.load(out / "optim.pt", weights_only=True)  # every rank reads the file
        before = mine.to_local().clone()
        for s in opt.state.values():
            for v in s.values():
                if isinstance(v, DTensor):
                    v.to_local().zero_()
        strategy.load_optimizer_state(osd)
        after = opt.state[p]["exp_avg"].to_local()
        diffs = torch.tensor([float((after - before).abs().max()), float(before.abs().max())])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        res["optim_reload_max_diff"], res["optim_local_absmax"] = diffs.tolist()
    if got_kind == "deepspeed":
        engine = acc.deepspeed_engine_wrapped.engine
        res["global_steps"] = int(engine.global_steps)
        moved = [int((a != b).sum()) for a, b in zip(zero_partition(engine)[0], masters0)]
        res["master_changed_frac_rank"] = sum(moved) / sum(t.numel() for t in masters0)
        got_kind = f"zero{stage}"
        # each rank's partition through a checkpoint folder (hapo_cli/learner/zero_state.py):
        # moments and fp32 masters wiped, then reloaded
        import torch.distributed as dist

        folder = out / f"{got_kind}-ckpt"
        if rank == 0:
            folder.mkdir(exist_ok=True)
        dist.barrier()
        strategy.save_rank_optimizer(folder)
        dist.barrier()
        masters, moments = zero_partition(engine)
        before = [t.detach().clone() for t in masters + moments]
        for t in masters + moments:
            t.data.add_(1.0)
        strategy.load_checkpoint_optimizer(folder)
        after = sum(zero_partition(engine), [])  # load_state_dict makes new moment tensors
        diffs = torch.tensor([max(float((a - b).abs().max()) for a, b in zip(after, before)),
                              float(len(moments)), float(sum(t.numel() for t in masters))])
        every = [torch.zeros_like(diffs) for _ in range(world)]
        dist.all_gather(every, diffs)
        res["zero_reload_max_diff"] = max(float(d[0]) for d in every)
        res["zero_moment_tensors"] = [int(d[1]) for d in every]
        res["zero_master_numel"] = [int(d[2]) for d in every]
        res["zero_files"] = sorted(p.name for p in folder.iterdir())
        res.update(async_zero_save(out / f"{got_kind}-run", strategy, engine, train_step))
    if rank == 0:
        tag = f"{got_kind}-{dtype}-{world}"
        torch.save(full1, out / f"{tag}.pt")
        (out / f"{tag}.json").write_text(json.dumps(res, indent=1, default=str))


def async_zero_save(run_dir: Path, strategy, engine, train_step) -> dict:
    """hapo_cli/learner/zero_checkpoint.py: an asynchronous save whose writes are held back past
    the next step's forward and backward. The next optimizer step waits for them, and the
    checkpoint holds the save step's partition bit for bit, not the next step's."""
    import threading
    import time

    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from hapo_cli.learner.checkpoint import checkpoint_dir
    from hapo_cli.learner.dcp_checkpoint import torch_optimizer
    from hapo_cli.learner.zero_checkpoint import ZeroCheckpointer, load_into_strategy

    order: list[str] = []
    real_save = TorchCheckpointEngine.save

    def late_save(self, state_dict, path):  # the writer thread, a second late
        assert threading.current_thread() is not threading.main_thread()
        time.sleep(1.0)
        real_save(self, state_dict, path)
        order.append("write")

    TorchCheckpointEngine.save = late_save
    try:
        saver = ZeroCheckpointer(run_dir, strategy, keep=2, async_save=True)
        saved = [t.detach().clone() for t in sum(zero_partition(engine), [])]
        saver.save(1, None, None, lambda folder: None)
        # after the saver's own hook: records when the step is let through
        torch_optimizer(engine.optimizer).register_step_pre_hook(lambda *_: order.append("step"))
        train_step()
        saver.wait()
    finally:
        TorchCheckpointEngine.save = real_save
    stepped = [t.detach().clone() for t in sum(zero_partition(engine), [])]
    load_into_strategy(checkpoint_dir(run_dir, 1), strategy)
    loaded = sum(zero_partition(engine), [])
    diffs = torch.tensor([max(float((a - b).abs().max()) for a, b in zip(loaded, saved)),
                          max(float((a - b).abs().max()) for a, b in zip(stepped, saved))])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    first = order.index("step") if "step" in order else len(order)
    return {"async_order_ok": bool(order.count("write") and "write" not in order[first:]
                                   and first < len(order)),
            "async_order": order, "async_loaded_vs_saved": float(diffs[0]),
            "async_next_step_moved": float(diffs[1])}


def main() -> None:
    # a rank that aborts in C++ (SIGABRT: gloo, DeepSpeed) prints its Python stacks first, so
    # the test's failure message says where (tests/test_strategy.py puts those lines last)
    faulthandler.enable(all_threads=True)
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    for case in sys.argv[2:]:
        kind, dtype, lr = case.split(":")
        run_case(out, kind, dtype, float(lr))
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"{DONE} rank {rank}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its gloo pairs while a peer still talks to it
        dist.destroy_process_group()
    # Every result is written; skip the interpreter's teardown, where C++ destructors of
    # DeepSpeed's and gloo's threads can abort the process (see CALIBRATION.md, DeepSpeed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
