"""What a `hapo serve` vLLM server loads into its worker: the `hapo_gloo` weight-transfer backend
and a worker extension (`--worker-extension-cls hapo_cli.rollout.server_worker:HapoWorkerExtension`).

Importing this module in the server registers the backend with vLLM's
`WeightTransferEngineFactory`, so `--weight-transfer-config '{"backend": "hapo_gloo"}'` selects it.
The learner never imports vLLM: its side of the transfer (`gloo_group`, `broadcast_chunk`) is plain
torch.distributed, shared with the worker through this module's pure helpers.

The gloo backend follows vLLM's dense NCCL backend (`vllm/distributed/weight_transfer/
nccl_engine.py`) on CPU: the learner is rank 0 of a 1 + server-world-size group (a TCPStore it
hosts), `/update_weights` carries one chunk's names, dtypes and shapes, the worker receives each
tensor by broadcast and hands it to the model's `load_weights` inside vLLM's layerwise-reload
lifecycle (`start_weight_update` / `finish_weight_update`), then re-processes a tied `lm_head`,
which that lifecycle leaves stale on CPU (its oneDNN handle keeps the old weight).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BACKEND = "hapo_gloo"
# config fields compared between the learner's model and a server's (names or shapes differ ->
# a different model)
SIGNATURE_FIELDS = (
    "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings",
)


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float,
               store: Any = None) -> Any:
    """A standalone gloo group (not the default process group): rank 0 hosts the TCPStore
    (pass it as `store`), the others connect to host:port. Blocks until all ranks joined."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
            host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore("hapo_gloo", store)  # pyright: ignore[reportPrivateImportUsage]
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def broadcast_tensor(group: Any, tensor: torch.Tensor) -> None:
    """Rank 0 sends `tensor` (contiguous); the others receive into it."""
    group.broadcast(tensor, 0).wait()


def signature_of(config: Any) -> dict[str, Any]:
    """The fields of an HF config that two copies of one model share."""
    out = {}
    for name in SIGNATURE_FIELDS:
        value = getattr(config, name, None)
        if name == "architectures" and value is not None:
            value = list(value)
        out[name] = value
    return out


def refresh_tied_lm_head(model: Any) -> bool:
    """Re-tie and re-process a tied `lm_head` after its embedding was reloaded (see the
    colocated engine's `_refresh_tied_lm_head`, the same fix)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    config = getattr(model, "config", None)
    if head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)
    return True


@dataclass
class GlooInitInfo:
    """`/init_weight_transfer_engine`'s init_info for the gloo backend."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo:
    """One chunk: its tensors' names (HF checkpoint names), dtypes and shapes, in send order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]] = field(default_factory=list)


class HapoWorkerExtension:
    """Methods `/collective_rpc` can call on a hapo server's worker (mixed into vLLM's worker)."""

    # vLLM's worker, which this class is mixed into, has these (annotations only: no attribute)
    model_runner: Any
    reload_weights: Any

    def hapo_model_signature(self) -> dict[str, Any]:
        return signature_of(self.model_runner.model_config.hf_config)

    def hapo_reload_from_path(self, weights_path: str) -> bool:
        """`rollout.server.weight_transfer: path`: reload a safetensors folder, then the head."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return refresh_tied_lm_head(self.model_runner.get_model())


def _register() -> None:
    try:
        # vllm is optional: absent from the lint venv
        from vllm.distributed.weight_transfer.base import (  # pyright: ignore[reportMissingImports]
            WeightTransferEngine,
        )
        from vllm.distributed.weight_transfer.factory import (  # pyright: ignore[reportMissingImports]
            WeightTransferEngineFactory,
        )
    except ImportError:  # the learner's side: no vLLM needed
        return
    if BACKEND in WeightTransferEngineFactory._registry:
        return

    class HapoGlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """Worker side of `hapo_gloo` (see the module docstring)."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            pc = self.parallel_config
            rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
            self.group = gloo_group(init_info.master_address, init_info.master_port, rank,
                                    init_info.world_size, init_info.timeout_s)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import (  # pyright: ignore[reportMissingImports]
                initialize_layerwise_reload,
            )

            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # the base class ends with torch.accelerator.synchronize(): nothing to wait for on CPU
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: GlooUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("hapo_gloo: /init_weight_transfer_engine was not called")
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names,
                                               update_info.shapes, strict=True):
                buf = torch.empty(shape, dtype=getattr(torch, dtype_name))
                broadcast_tensor(self.group, buf)
                self.model.load_weights([(name, buf)])

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import (  # pyright: ignore[reportMissingImports]
                finalize_layerwise_reload,
            )

            finalize_layerwise_reload(self.model, self.model_config)
            refresh_tied_lm_head(self.model)

        def shutdown(self) -> None:
            self.group = None

    WeightTransferEngineFactory.register_engine(BACKEND, HapoGlooWeightTransferEngine)


def update_info_of(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The JSON `update_info` of one chunk (the learner's side)."""
    return {
        "names": list(names),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors],
        "shapes": [list(t.shape) for t in tensors],
    }


_register()
