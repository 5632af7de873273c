"""`rollout.engine: vllm-server`: rollouts on vLLM servers (`hapo serve`), new weights pushed after
every optimizer step through vLLM's own RL routes. The learner needs no vLLM.

Requests. The same requests as the colocated engine (`vllm.build_requests`: one per prompt with
n samples, the seed a function of (step seed, global prompt index), component A's parameters in
`extra_args["hapo"]`), posted to `/inference/v1/generate` (token ids in and out; the one route
that passes nested `extra_args` to the server's logits processor), split into contiguous runs of
prompts across `rollout.server.urls`, all in flight at once. Replies become the colocated
engine's `RequestOutput`s and go through its `parse_outputs`: the same processed log-probs, the
same `decode_stats=False` batch. A prompt samples alike alone or in a batch, so the split changes
no sample.

Weights (`sync_from`, after every optimizer step; every rank calls it): every rank iterates
`hapo_cli.sharded.full_named_parameters` (the gather under FSDP2 / ZeRO-3 is a collective), merged
under `model.lora` (`lora.engine_weights`); rank 0 alone sends, in chunks of
`rollout.server.chunk_mib`:
- gloo (CPU) / nccl (GPUs): `/start_weight_update`, then per chunk `/update_weights` (names,
  dtypes, shapes) posted in a thread while rank 0 broadcasts the tensors over the transfer group
  it formed with each server at `/init_weight_transfer_engine`, then `/finish_weight_update` (the
  server's layerwise reload, then a tied `lm_head` re-processed: `server_worker.py`). nccl is
  vLLM's own backend and needs CUDA on both sides: NOT tested here (no GPU in CI).
- path: rank 0 writes a safetensors file under `rollout.server.path` (a filesystem the servers
  share), then `/collective_rpc` -> the worker's `hapo_reload_from_path`.
Then `/reset_prefix_cache`. The first push happens before the first rollout (the servers may
serve any checkpoint of the same model: a resumed run pushes its checkpoint's weights).

Faults are one line naming the URL (`ServerError`, a HapoError): an unreachable server after
`rollout.server.connect_timeout_s`, a server of a different model (its config's names and shapes,
`hapo_model_signature`) before step 1, a server that stops answering mid-run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..algo import EntropyStats
from ..errors import HapoError
from .base import EngineCapabilities, RolloutBatch, SamplingSpec, check_prompts
from .server_worker import BACKEND, broadcast_tensor, gloo_group, signature_of, update_info_of
from .vllm import build_requests, hf_to_vllm_name, parse_outputs


class ServerError(HapoError):
    """A vLLM server that cannot be reached, serves another model or stopped answering."""


class ServerClient:
    """JSON over HTTP to one server; every failure is a `ServerError` naming its URL."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def call(self, path: str, body: Any = None, *, timeout_s: float | None = None,
             what: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data,
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace").replace("\n", " ")[:200]
            if err.code >= 500:  # e.g. EngineDeadError: its engine core died
                raise ServerError(f"vLLM server {self.url} failed ({path} answered {err.code}: "
                                  f"{detail})") from None
            raise ServerError(f"vLLM server {self.url}{path} answered {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerError(f"vLLM server {self.url} stopped answering ({what or path}: "
                              f"{type(reason).__name__}: {reason})") from None
        return json.loads(text) if text.strip() else None

    def wait_up(self, timeout_s: float) -> None:
        """Until /health answers, or one line after `timeout_s` (never a hang)."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while True:
            try:
                self.call("/health", timeout_s=min(5.0, max(timeout_s, 0.5)))
                return
            except ServerError as err:
                last = err
            if time.monotonic() >= deadline:
                raise ServerError(f"vLLM server {self.url} unreachable after {timeout_s:.0f} s "
                                  f"({str(last).split('(', 1)[-1].rstrip(')')}); start one "
                                  "with `hapo serve MODEL --port P` or fix rollout.server.urls")
            time.sleep(0.5)


def reply_as_output(reply: dict[str, Any], url: str) -> SimpleNamespace:
    """A `/inference/v1/generate` reply as the `RequestOutput` shape `parse_outputs` reads."""
    outs = []
    for c in reply.get("choices", []):
        content = (c.get("logprobs") or {}).get("content") or []
        ids = list(c.get("token_ids") or [])
        logprobs = [{e["token_id"]: SimpleNamespace(logprob=e["logprob"])} for e in content]
        if len(logprobs) != len(ids):
            raise ServerError(f"vLLM server {url}: {len(logprobs)} log-probs for {len(ids)} tokens "
                              "(was it started by `hapo serve`?)")
        if c.get("finish_reason") == "abort":  # SIGTERM: vLLM aborts what is in flight
            raise ServerError(f"vLLM server {url} stopped answering (generate: request aborted, "
                              "the server is shutting down or its engine failed)")
        outs.append(SimpleNamespace(index=c["index"], token_ids=ids, logprobs=logprobs,
                                    finish_reason=c.get("finish_reason")))
    return SimpleNamespace(outputs=outs)


def split_evenly(n: int, parts: int) -> list[range]:
    """Contiguous runs of range(n), sizes differing by at most one, the longer first."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        out.append(range(start, start + size))
        start += size
    return out


def _local_address(url: str) -> str:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the route towards the server
        s.connect((host, 9))
        return s.getsockname()[0]


class VLLMServerEngine(EngineCapabilities):
    """`RolloutEngine` over vLLM servers (see the module docstring)."""

    push_before_first_rollout = True  # the servers may serve any checkpoint of the model

    def __init__(self, cfg: Any, urls: Sequence[str], tokenizer: Any, *, is_sender: bool = True,
                 eos_token_id: int | Sequence[int] | None = None,
                 owned: Sequence[Any] = ()) -> None:
        if not urls:
            raise ServerError("rollout.server.urls is empty and no local server was started")
        self.cfg, self.is_sender, self.owned = cfg, is_sender, list(owned)
        self.clients = [ServerClient(u, cfg.request_timeout_s) for u in urls]
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = [int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))]
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self._groups: list[Any] | None = None
        self._version = 0
        self.initial_weights: nn.Module | None = None  # pushed before a first generate that
        # no push preceded (one process, e.g. `hapo evaluate`; training pushes first itself)
        self.push_seconds: list[float] = []
        for c in self.clients:
            c.wait_up(cfg.connect_timeout_s)

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clients]

    # -- checks ------------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> None:
        """One line before step 1 when a server serves a model whose config differs."""
        mine = signature_of(getattr(model, "config", None))
        for c in self.clients:
            got = c.call("/collective_rpc", {"method": "hapo_model_signature"}, what="model check")
            theirs = (got or {}).get("results", [None])[0]
            if not isinstance(theirs, dict):
                raise ServerError(f"vLLM server {c.url} has no hapo worker extension: start it "
                                  "with `hapo serve`")
            diff = [k for k in mine if mine[k] is not None and theirs.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise ServerError(f"vLLM server {c.url} serves another model: {k}={theirs.get(k)!r}"
                                  f", the learner's is {mine[k]!r} (serve the run's model)")

    # -- sampling ----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec,
                 stats: EntropyStats | None = None, seed: int = 0,
                 prompt_offset: int | Sequence[int] = 0) -> RolloutBatch:
        check_prompts(prompt_ids)
        if self.initial_weights is not None and not self.push_seconds:
            self.sync_weights(self.initial_weights)
        prompts, kwargs = build_requests(prompt_ids, spec, stats, seed, self.eos_ids,
                                         prompt_offset=prompt_offset)
        runs = split_evenly(len(prompts), len(self.clients))
        jobs = [(self.clients[k], i) for k, run in enumerate(runs) for i in run]
        body = [{"token_ids": p["prompt_token_ids"], "sampling_params": kw}
                for p, kw in zip(prompts, kwargs, strict=True)]
        width = min(len(jobs), self.cfg.max_inflight * len(self.clients))
        with ThreadPoolExecutor(max_workers=max(width, 1)) as pool:
            replies = list(pool.map(
                lambda job: job[0].call("/inference/v1/generate", body[job[1]], what="generate"),
                jobs))
        outputs = [reply_as_output(r, c.url) for r, (c, _) in zip(replies, jobs, strict=True)]
        return parse_outputs(outputs, len(prompt_ids), spec, self.pad_id)

    # -- weights -----------------------------------------------------------------------------

    def sync_weights(self, weights: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        pairs = weights.named_parameters() if isinstance(weights, nn.Module) else weights
        t0 = time.perf_counter()
        with torch.no_grad():
            if not self.is_sender:  # join the gather, send nothing
                for _ in pairs:
                    pass
                return
            if self.cfg.weight_transfer == "path":
                self._push_path(pairs)
            else:
                self._push_broadcast(pairs)
            for c in self.clients:
                c.call("/reset_prefix_cache", {}, what="reset_prefix_cache")
        self.push_seconds.append(time.perf_counter() - t0)

    def sync_from(self, model: nn.Module, accelerator: Any = None) -> None:
        from ..lora import engine_weights
        from ..sharded import full_named_parameters

        # model.lora: W + scale B A under the base names (`lora.engine_weights`)
        self.sync_weights(engine_weights(model, full_named_parameters(model, accelerator)))
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            # the other ranks finish their part (the gather) first: none may post a generate
            # while rank 0's update is in flight (a server then runs a half-loaded model)
            accelerator.wait_for_everyone()

    def _chunks(self, pairs: Iterable[tuple[str, Tensor]]):
        limit = int(self.cfg.chunk_mib * 2**20)
        names: list[str] = []
        tensors: list[Tensor] = []
        size = 0
        for name, t in pairs:
            t = t.detach()
            names.append(hf_to_vllm_name(name))
            tensors.append(t if t.is_contiguous() else t.contiguous())
            size += t.numel() * t.element_size()
            if size >= limit:
                yield names, tensors
                names, tensors, size = [], [], 0
        if names:
            yield names, tensors

    def _init_groups(self) -> list[Any]:
        """One transfer group per server: rank 0 = this process (it hosts the TCPStore)."""
        import torch.distributed as dist

        backend = "nccl" if self.cfg.weight_transfer == "nccl" else BACKEND
        groups = []
        for c in self.clients:
            info = c.call("/get_world_size", what="weight transfer set-up")
            world = int(info["world_size"]) + 1
            host = self.cfg.master_address or _local_address(c.url)
            if backend == "nccl":  # vLLM's endpoint hosts its own store on the port
                store = None
                with socket.socket() as sock:
                    sock.bind((host, 0))
                    port = sock.getsockname()[1]
            else:
                store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
                    host, 0, world, True, wait_for_workers=False)
                port = store.port
            init = {"master_address": host, "master_port": port, "world_size": world,
                    "rank_offset": 1}
            with ThreadPoolExecutor(max_workers=1) as pool:
                fut = pool.submit(c.call, "/init_weight_transfer_engine", {"init_info": init},
                                  what=f"/init_weight_transfer_engine ({backend})")
                if backend == "nccl":  # vLLM's own trainer endpoint (CUDA only: untested here)
                    from vllm.distributed.weight_transfer.nccl_common import (  # pyright: ignore[reportMissingImports]
                        trainer_init,
                    )

                    groups.append(("nccl", trainer_init(init)))
                else:
                    groups.append(("gloo", gloo_group(host, port, 0, world,
                                                      self.cfg.request_timeout_s, store=store)))
                fut.result()
        return groups

    def _push_broadcast(self, pairs: Iterable[tuple[str, Tensor]]) -> None:
        if self._groups is None:
            self._groups = self._init_groups()
        for c in self.clients:
            c.call("/start_weight_update", {}, what="/start_weight_update")
        for names, tensors in self._chunks(pairs):
            info = update_info_of(names, tensors)
            with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
                futs = [pool.submit(c.call, "/update_weights", {"update_info": info},
                                    what="/update_weights") for c in self.clients]
                for t in tensors:
                    send = t.cpu() if self._groups[0][0] == "gloo" else t
                    for c, (kind, group) in zip(self.clients, self._groups, strict=True):
                        try:
                            if kind == "gloo":
                                broadcast_tensor(group, send)
                            else:
                                group.broadcast(send, src=0, stream=torch.cuda.current_stream())
                        except RuntimeError as err:  # the server died mid-push: gloo/nccl reset
                            first = (str(err).strip().splitlines() or ["?"])[0]
                            raise ServerError(f"vLLM server {c.url} stopped answering (weight "
                                              f"push: {first[:200]})") from None
                for f in futs:
                    f.result()
        self._version += 1
        for c in self.clients:
            c.call("/finish_weight_update", {"weight_version": str(self._version)},
                   what="/finish_weight_update")

    def _push_path(self, pairs: Iterable[tuple[str, Tensor]]) -> None:
        from safetensors.torch import save_file

        folder = Path(self.cfg.path or "weights-push").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for names, tensors in self._chunks(pairs):
            state.update({n: t.cpu().clone() for n, t in zip(names, tensors, strict=True)})
        tmp = folder / f".model.safetensors.{os.getpid()}"
        save_file(state, str(tmp))
        os.replace(tmp, folder / "model.safetensors")
        for c in self.clients:
            c.call("/collective_rpc", {"method": "hapo_reload_from_path",
                                       "kwargs": {"weights_path": str(folder)}}, what="reload")
        self._version += 1

    # -- lifecycle ---------------------------------------------------------------------------

    def sleep(self) -> None:
        """Nothing to free here: the servers hold their own memory."""

    def wake_up(self) -> None:
        """See `sleep`."""

    def close(self) -> None:
        """Stop the servers this engine started (`rollout.server.urls` empty); others stay."""
        owned, self.owned = self.owned, []
        threads = [threading.Thread(target=s.stop) for s in owned]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
