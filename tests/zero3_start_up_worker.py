"""ZeRO-3 sharded start-up and shared fp32 masters (run by torchrun from
tests/test_zero3_start_up.py; not collected by pytest).

    python -m torch.distributed.run --nproc_per_node 2 tests/zero3_start_up_worker.py OUT MODEL_DIR ...

Every rank, for each MODEL_DIR (i: its index):
- loads it twice under ZeRO-3 with zero3_init_flag: `load_policy_zero3` (only its flat ranges
  read) and transformers' `from_pretrained` inside `deepspeed.zero.Init`, and writes both
  versions of its partitions and buffers to OUT.<i>.<rank>.pt;
- for the first folder only, trains 2 steps from the sharded start-up through
  `Strategy.prepare` twice: as hapo does (fp32 masters shared with the partitions) and with
  DeepSpeed's own second copy (`share_fp32_masters` made a no-op), writing the partitions, the
  Adam moments and whether the storage was shared to OUT.steps.<rank>.pt.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch


def partitions(model) -> dict[str, torch.Tensor]:
    """This rank's partition of every parameter (its valid elements), and every buffer."""
    sd = {}
    for n, p in model.named_parameters():
        t = p.ds_tensor
        size = t.ds_numel
        valid = max(0, min(size, p.ds_numel - size * p.ds_zero_partition_rank))
        sd[f"param.{n}"] = t[:valid].detach().clone()
    sd.update({f"buffer.{n}": b.detach().clone() for n, b in model.named_buffers()})
    return sd


def strategy_for():
    from accelerate.state import AcceleratorState

    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.strategy import Strategy, build_accelerator

    AcceleratorState._reset_state(True)
    precision = resolve_precision("float32", "no")
    acc, kind = build_accelerator(precision)
    assert kind == "deepspeed", kind
    return Strategy(kind, acc, precision)


def steps(strategy, model_dir: str, share: bool) -> dict:
    """2 AdamW steps (2 micro-batches each) from the sharded start-up."""
    import hapo_cli.learner.strategy as strategy_mod
    from hapo_cli.learner.forward import response_logprobs, unwrap
    from hapo_cli.learner.sharded_load import load_policy_zero3

    got = load_policy_zero3(Path(model_dir), strategy)
    assert got is not None
    model = got[0]
    model.train()
    vocab = model.config.vocab_size
    real = strategy_mod.share_fp32_masters
    if not share:
        strategy_mod.share_fp32_masters = lambda optimizer: 0
    try:
        model, opt = strategy.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                                      engine="vllm", micro_batch_size=2, grad_clip=1e9)
    finally:
        strategy_mod.share_fp32_masters = real
    zopt = strategy.accelerator.deepspeed_engine_wrapped.engine.optimizer
    shared = [m.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr()
              for m, lp in zip(zopt.fp32_partitioned_groups_flat,
                               zopt.fp16_partitioned_groups_flat)]
    g = torch.Generator().manual_seed(strategy.accelerator.process_index)
    ids = torch.randint(2, vocab, (4, 12), generator=g)
    am = torch.ones_like(ids)
    for _ in range(2):
        for i, rows in enumerate((slice(0, 2), slice(2, 4))):
            with strategy.micro_batch(i, 2):
                logp, _ = response_logprobs(model, ids[rows], am[rows], 6, None, fused=True,
                                            chunk_size=8, entropy=False)
                strategy.backward(-logp.mean())
        strategy.clip_and_step(1e9)
    moments = [v.detach().clone() for st in zopt.optimizer.state.values()
               for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"partitions": partitions(unwrap(model)), "moments": moments, "shared": shared}


def main(out: str, *model_dirs: str) -> None:
    from hapo_cli.learner.sharded_load import load_policy_zero3
    from hapo_cli.model_dirs import load_policy

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = "3"
    os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "true"
    torch.set_num_threads(1)
    strategy = strategy_for()
    rank = strategy.accelerator.process_index
    for i, model_dir in enumerate(model_dirs):
        got = load_policy_zero3(Path(model_dir), strategy)
        assert got is not None, "the tiny model's folder is supported"
        sharded, _ = got
        full, _ = load_policy(model_dir, torch.float32)  # transformers' zero.Init path
        assert hasattr(next(full.parameters()), "ds_tensor"), "from_pretrained under zero.Init"
        torch.save({"sharded": partitions(sharded), "full": partitions(full),
                    "tied": sharded.lm_head.weight is sharded.get_input_embeddings().weight,
                    "numel": sum(p.ds_numel for p in sharded.parameters())},
                   f"{out}.{i}.{rank}.pt")
    runs = {}
    for share in (True, False):
        runs[share] = steps(strategy_for(), model_dirs[0], share)
    torch.save(runs, f"{out}.steps.{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(400, exit=True)
    main(*sys.argv[1:])
