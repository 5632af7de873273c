"""vLLM servers vs the colocated vLLM engine: what a training step pays for rollouts and weights
(`rollout.engine: vllm-server` vs `vllm`), and seconds per weight push vs model bytes. Needs
vLLM (its CPU build works: `.venv-vllm/bin/python bench/bench_server.py`); `make bench` runs it
when that venv exists. Starts its servers itself (`hapo_cli.serve`) and stops them.

Step: the tiny recipe's rollout (16 prompts x 8 samples x <= 32 new tokens, random weights: every
response runs to the limit) plus one weight sync, the part of a step that differs between the
engines (the learner's forward/backward is the same). Colocated: `VLLMEngine.generate` +
`sync_weights` (the worker's reload_weights, in process). Server: HTTP `/inference/v1/generate`
+ a `hapo_gloo` push (and a `path` push). Medians over alternating rounds.

Push vs bytes: tied Qwen2 models of three sizes, one server each, gloo pushes (median of 5).

Run: python bench/bench_server.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {  # name -> (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 2, 256),
    "small": (256, 4, 8, 1024),
    "medium": (512, 8, 16, 2048),
}


def _model(root: Path, hidden: int, layers: int, heads: int, inter: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hapo_cli.models import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=inter, max_position_embeddings=256,
                      tie_word_embeddings=True, use_sliding_window=False, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return model, tok


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(rounds: int = 4) -> list[dict[str, object]]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM not importable here: skipped (.venv-vllm/bin/python bench/bench_server.py)")
        return []
    from rich.console import Console
    from rich.table import Table

    from hapo_cli.recipe import VllmConfig
    from hapo_cli.rollout import SamplingSpec
    from hapo_cli.rollout.server import VLLMServerEngine
    from hapo_cli.rollout.server_local import free_port
    from hapo_cli.rollout.vllm import VLLMEngine
    from hapo_cli.sections import ServerConfig
    from hapo_cli.serve import ServerProcess, server_command

    out: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        servers = {}
        try:
            for name, dims in SIZES.items():
                path = Path(tmp) / name
                models[name] = (*_model(path, *dims), path)
                argv, env, url = server_command(str(path), "127.0.0.1", free_port(), {},
                                                dtype="float32", max_model_len=128)
                servers[name] = ServerProcess(argv, env, url, log_path=Path(tmp) / f"{name}.log")
                servers[name].start()
            t0 = time.perf_counter()
            for s in servers.values():
                s.wait_ready(1200)
            start_s = time.perf_counter() - t0

            model, tok, path = models["tiny"]
            prompts = [tok(f"{a}+{a + 3}-{a // 2}=", add_special_tokens=False)["input_ids"]
                       for a in range(10, 26)]
            spec = SamplingSpec(n=8, temperature=1.0, max_new_tokens=32)
            colocated = VLLMEngine(str(path), VllmConfig(), tokenizer=tok, max_model_len=128,
                                   dtype="float32", seed=0)
            cfg = ServerConfig(urls=[servers["tiny"].url])
            gloo = VLLMServerEngine(cfg, cfg.urls, tok)
            via_path = VLLMServerEngine(cfg.model_copy(update={
                "weight_transfer": "path", "path": str(Path(tmp) / "push")}), cfg.urls, tok)
            cases = {"colocated vllm": colocated, "server (gloo push)": gloo,
                     "server (path push)": via_path}
            for eng in cases.values():  # warm-up round
                eng.generate(prompts, spec, None, seed=0)
                eng.sync_weights(model)
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
            for r in range(rounds):
                for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
                    eng = cases[name]
                    t0 = time.perf_counter()
                    eng.generate(prompts, spec, None, seed=r)
                    t1 = time.perf_counter()
                    eng.sync_weights(model)
                    times[name].append((t1 - t0, time.perf_counter() - t1))
            table = Table(title="rollout + weight sync per step, tiny recipe (16 x 8 x 32 tokens)")
            for col in ("engine", "rollout s", "sync s", "step part s"):
                table.add_column(col)
            for name, ts in times.items():
                g = statistics.median(t[0] for t in ts)
                s = statistics.median(t[1] for t in ts)
                table.add_row(name, f"{g:.3f}", f"{s:.3f}", f"{g + s:.3f}")
                out.append({"case": name, "rollout_s": g, "sync_s": s})

            push = Table(title=f"weight push (hapo_gloo) vs model bytes; servers up in "
                         f"{start_s:.0f} s")
            for col in ("model", "parameters", "MiB", "s / push", "MiB/s"):
                push.add_column(col)
            for name in SIZES:
                model, tok, _ = models[name]
                c = ServerConfig(urls=[servers[name].url])
                eng = VLLMServerEngine(c, c.urls, tok)
                eng.sync_weights(model)  # sets up the transfer group
                secs = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    eng.sync_weights(model)
                    secs.append(time.perf_counter() - t0)
                s = statistics.median(secs)
                mib = _nbytes(model) / 2**20
                push.add_row(name, f"{sum(p.numel() for p in model.parameters()):,}",
                             f"{mib:.1f}", f"{s:.3f}", f"{mib / s:.0f}")
                out.append({"case": f"push {name}", "mib": mib, "push_s": s})
            console = Console()
            console.print(table)
            console.print(push)
        finally:
            for s in servers.values():
                s.stop()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    main(ap.parse_args().rounds)
