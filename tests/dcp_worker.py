"""DCP checkpoints of the tiny Qwen2 under each learner strategy (run by torchrun from
tests/test_dcp.py; not collected by pytest).

    python -m torch.distributed.run --nproc_per_node N tests/dcp_worker.py OUT CASE ...

CASE `save:KIND:MODE:NAME`: one AdamW step, the state (model + optimizer) saved into
OUT/NAME with `Checkpointer` (MODE sync or async), a second step taken while an async write
may still run (the continuation), then the checkpoint loaded back into the live model: every
rank's own tensors must come back bit for bit. CASE `load:KIND:NAME`: a fresh model (other
initial weights) loads OUT/NAME in this layout (resharding), then takes the second step.
Rank 0 writes OUT/<case tag>.pt: the gathered weights and Adam moments after the load/save
and after the second step.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from strategy_worker import batch, tiny_model

DONE = "dcp_worker: every case written,"


def full_state(model, opt) -> dict[str, torch.Tensor]:
    """Gathered weights and Adam moments, keyed by name (collective; full on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from hapo_cli.learner.dcp_checkpoint import torch_optimizer

    msd, osd = get_state_dict(model, torch_optimizer(opt),
                              options=StateDictOptions(full_state_dict=True,
                                                       broadcast_from_rank0=False))
    out = {f"model.{k}": v.detach().cpu().clone() for k, v in msd.items()}
    for name, st in osd["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"optim.{name}.{k}"] = st[k].detach().cpu().clone()
    return out


def local_tensors(model, opt) -> dict[str, torch.Tensor]:
    """This rank's own tensors of the checkpointed state (a DTensor's local shard)."""
    from hapo_cli.learner.dcp_checkpoint import train_state

    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
        elif isinstance(x, torch.Tensor):
            t = x.to_local() if hasattr(x, "to_local") else x
            flat[prefix] = t.detach().clone()

    walk("", train_state(model, opt))
    return flat


def setup(kind: str):
    from accelerate.state import AcceleratorState

    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.strategy import Strategy, build_accelerator

    AcceleratorState._reset_state(True)
    os.environ["ACCELERATE_USE_FSDP"] = "true" if kind == "fsdp2" else "false"
    os.environ["FSDP_VERSION"] = "2"
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    precision = resolve_precision("float32", "no")
    acc, got = build_accelerator(precision)
    strategy = Strategy(got, acc, precision)
    return acc, strategy


def step(model, opt, strategy, acc) -> None:
    """One AdamW step on the fixed global batch (each rank its rows)."""
    from hapo_cli.learner.forward import response_logprobs

    ids, am, T, adv = batch()
    world, rank = acc.num_processes, acc.process_index
    local = ids.shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    ids, am, adv = ids[rows], am[rows], adv[rows]
    mask = am[:, -T:].bool()
    normalizer = float(batch()[1][:, -T:].sum())
    with strategy.micro_batch(0, 1):
        logp, _ = response_logprobs(model, ids, am, T, None, fused=True, chunk_size=16,
                                    entropy=False)
        loss = -(logp * adv[:, None] * mask).sum()
        strategy.backward(loss / normalizer * world)
    strategy.clip_and_step(1e9)
    opt.zero_grad(set_to_none=True)


def run_case(out: Path, case: str) -> None:
    from hapo_cli.learner.dcp_checkpoint import Checkpointer, load_train_state

    what, kind, *rest = case.split(":")
    acc, strategy = setup(kind)
    seed = 0 if what == "save" else 1  # a loading model starts from other weights
    model, opt = strategy.prepare(
        tiny_model(seed), lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
        engine="vllm", micro_batch_size=2, grad_clip=1e9)
    rank, world = acc.process_index, acc.num_processes
    res: dict = {"kind": strategy.kind, "world": world}
    if what == "save":
        mode, name = rest
        step(model, opt, strategy, acc)
        mine = local_tensors(model, opt)
        first = full_state(model, opt)
        saver = Checkpointer(out / "run", acc, keep=10, async_save=mode == "async")
        folder = out / "run" / "checkpoints" / f"step-{int(name):06d}"

        def small(tmp):
            (tmp / "trainer_state.json").write_text(json.dumps({"step": int(name)}))

        saver.save(int(name), model, opt, small)
        res["stall_s"] = saver.last_stall_s
        step(model, opt, strategy, acc)  # changes every tensor while the write may still run
        second = full_state(model, opt)
        saver.wait()
        acc.wait_for_everyone()
        load_train_state(folder, model, opt)
        back = local_tensors(model, opt)
        diff = max(float((back[k].float() - mine[k].float()).abs().max()) for k in mine)
        res["reload_keys_equal"] = sorted(back) == sorted(mine)
        tag = f"save-{kind}-{world}-{name}"
    else:
        name = rest[0]
        folder = out / "run" / "checkpoints" / f"step-{int(name):06d}"
        load_train_state(folder, model, opt)
        first = full_state(model, opt)
        step(model, opt, strategy, acc)
        second = full_state(model, opt)
        diff = 0.0
        tag = f"load-{kind}-{world}-{name}"
    d = torch.tensor([diff])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(d, op=dist.ReduceOp.MAX)
    res["reload_max_diff"] = float(d)
    if rank == 0:
        torch.save({"first": first, "second": second}, out / f"{tag}.pt")
        (out / f"{tag}.json").write_text(json.dumps(res))
    acc.wait_for_everyone()


def main() -> None:
    faulthandler.enable(all_threads=True)
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    for case in sys.argv[2:]:
        run_case(out, case)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        if int(os.environ.get("RANK", "0")) == 0:
            print(DONE, flush=True)
        dist.destroy_process_group()
    else:
        print(DONE, flush=True)


if __name__ == "__main__":
    main()
