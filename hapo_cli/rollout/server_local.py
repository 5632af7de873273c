"""Building the `vllm-server` engine: the servers of `rollout.server.urls`, or, when that list is
empty, `rollout.server.count` local servers this process starts (`hapo_cli.serve`) and owns.

Local servers: started by the main process only, each `hapo_cli.serve.ServerProcess` (its own
process group under a guard that ends it even if this process is SIGKILLed), logs in
<run>/server-K.log, process groups in <run>/servers.pid (a leftover from a killed run is stopped
first); the URLs reach the other ranks by `broadcast_object_list`. The engine's `close()` stops
them; a failure while starting stops the ones already up.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from .server import ServerError, VLLMServerEngine

PID_FILE = "servers.pid"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_servers(cfg: Any, model_path: str, run_dir: Path | None, *,
                        max_model_len: int | None, dtype: str, seed: int,
                        cpu_kv_cache_gib: float) -> list[Any]:
    """`cfg.count` ready servers of `model_path` on 127.0.0.1 (see the module docstring)."""
    from ..serve import ServerProcess, server_command, stop_leftovers

    pid_file = None if run_dir is None else Path(run_dir) / PID_FILE
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        stop_leftovers(pid_file)
    transfer = "gloo" if cfg.weight_transfer == "path" else cfg.weight_transfer
    servers: list[Any] = []
    try:
        for k in range(cfg.count):
            argv, env, url = server_command(
                model_path, "127.0.0.1", free_port(), {}, transfer=transfer,
                dtype="float32" if dtype == "auto" else dtype, max_model_len=max_model_len,
                seed=seed, cpu_kv_cache_gib=cpu_kv_cache_gib)
            log = None if run_dir is None else Path(run_dir) / f"server-{k}.log"
            servers.append(ServerProcess(argv, env, url, log_path=log, pid_file=pid_file).start())
        for s in servers:
            s.wait_ready(cfg.start_timeout_s)
    except BaseException:  # Ctrl-C while waiting included
        for s in servers:
            s.stop()
        raise
    return servers


def _shared(obj: Any, accelerator: Any) -> Any:
    """The main process's `obj` on every rank (identity without a process group)."""
    import torch.distributed as dist

    if accelerator is None or getattr(accelerator, "num_processes", 1) == 1 \
            or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_server_engine(rollout_cfg: Any, model: Any, tokenizer: Any, model_path: str | None,
                        accelerator: Any = None, *, run_dir: Path | None = None,
                        max_model_len: int | None = None, dtype: str = "auto",
                        seed: int = 0) -> VLLMServerEngine:
    """The engine over `rollout.server.urls` or over local servers it starts (module docstring);
    checks each server's model against `model`'s config before returning."""
    cfg = rollout_cfg.server
    is_main = accelerator is None or accelerator.is_main_process
    owned: list[Any] = []
    urls = list(cfg.urls)
    if not urls:
        if not model_path:
            raise ServerError("rollout.engine=vllm-server with no rollout.server.urls needs a "
                              "model folder to start local servers from")
        if is_main:
            owned = start_local_servers(
                cfg, model_path, run_dir, max_model_len=max_model_len, dtype=dtype, seed=seed,
                cpu_kv_cache_gib=rollout_cfg.vllm.cpu_kv_cache_gib)
            urls = [s.url for s in owned]
        urls = _shared(urls, accelerator)
    if cfg.weight_transfer == "path" and cfg.path is None and run_dir is not None:
        cfg = cfg.model_copy(update={"path": str(Path(run_dir) / "weights-push")})
    try:
        engine = VLLMServerEngine(cfg, urls, tokenizer, is_sender=is_main, owned=owned)
        if model is not None and is_main:
            engine.check_model(model)
        if accelerator is None:  # one process outside training (evaluate): push on first use
            engine.initial_weights = model
    except BaseException:
        for s in owned:
            s.stop()
        raise
    return engine
