"""Sharded start-up vs a full load under FSDP2 (run by torchrun from tests/test_sharded_load.py;
not collected by pytest).

    python -m torch.distributed.run --nproc_per_node N tests/sharded_load_worker.py OUT MODEL_DIR ...

Every rank loads each MODEL_DIR twice: `load_policy_sharded` (only its slices read), and
`load_policy` (the full model) then `fully_shard`. Each rank writes OUT.<i>.<rank>.pt (i: the
folder's index): both versions of its local shards and buffers, whether the LM head is still
tied, whether every parameter is a DTensor.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch


def local(model) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter, and every buffer."""
    sd = {f"param.{n}": (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
          for n, p in model.named_parameters()}
    sd.update({f"buffer.{n}": b.detach().clone() for n, b in model.named_buffers()})
    return sd


def main(out: str, *model_dirs: str) -> None:
    from hapo_cli.learner.fsdp2 import apply_fsdp2
    from hapo_cli.learner.precision import resolve_precision
    from hapo_cli.learner.sharded_load import load_policy_sharded
    from hapo_cli.learner.strategy import Strategy, build_accelerator
    from hapo_cli.model_dirs import load_policy

    os.environ["ACCELERATE_USE_FSDP"] = "true"
    os.environ["FSDP_VERSION"] = "2"
    precision = resolve_precision("float32", "no")
    acc, kind = build_accelerator(precision)
    strategy = Strategy(kind, acc, precision)
    for i, model_dir in enumerate(model_dirs):
        got = load_policy_sharded(Path(model_dir), strategy)
        assert got is not None, "the tiny model's folder is supported"
        sharded, _ = got
        full, _ = load_policy(model_dir, torch.float32)
        full = apply_fsdp2(full, precision, acc.device)
        torch.save({"sharded": local(sharded), "full": local(full),
                    "tied": sharded.lm_head.weight is sharded.get_input_embeddings().weight,
                    "dtensor": all(hasattr(p, "to_local") for p in sharded.parameters())},
                   f"{out}.{i}.{acc.process_index}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(*sys.argv[1:])
