"""Smoke test of the vLLM rollout engine on CUDA or on vLLM's CPU build (vLLM >= 0.31, < 0.34).

    python scripts/vllm_smoke.py [MODEL_DIR] [--tau 0.5] [--n 4] [--max-new-tokens 32]
        [--weight-sync auto|load_weights|reload_weights]

MODEL_DIR is a local HF causal-LM directory (e.g. a hapo warm-up cache entry or a checkpoint);
without it the embedded tiny model (random weights) is built in a temporary directory. The
device is CUDA when available, else the CPU (vLLM's CPU build: `make test-vllm`'s venv).
It samples with and without component A, recomputes every sampled token's log-prob with the HF
model in float32 (logits / T_t, T_t from the HF entropy and the same stats), and prints a table:
the gap between vLLM's log-probs and that recomputation should be ~0 (float32 engine), and much
smaller than the gap to a recomputation at the base T when A is on (proof that the plugin ran).
Then it checks weight sync: perturbed HF weights -> sleep -> sync_weights -> wake -> vLLM's
log-probs must match the perturbed model's. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch


def hf_recompute(model, prompts, batch, base_t, tau, stats):
    """Per valid token: (HF logp at T_t, HF logp at base T, HF entropy, T_t), flattened."""
    from hapo_cli.algo import token_entropy
    from hapo_cli.rollout import recompute_adaptive_temperature

    out = {"logp_tt": [], "logp_t": [], "entropy": [], "temp": [], "vllm": []}
    for b, toks in enumerate(batch.response_token_lists()):
        prompt = prompts[int(batch.prompt_index[b])]
        ids = torch.tensor([prompt + toks], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        logits = logits[len(prompt) - 1 : len(prompt) + len(toks) - 1]  # (R, V)
        y = torch.tensor(toks, device=logits.device)[:, None]
        ent = token_entropy(logits)
        temps = recompute_adaptive_temperature(ent, base_t, tau, stats)
        out["logp_tt"].append(torch.log_softmax(logits / temps[:, None], -1).gather(1, y)[:, 0])
        out["logp_t"].append(torch.log_softmax(logits / base_t, -1).gather(1, y)[:, 0])
        out["entropy"].append(ent)
        out["temp"].append(temps)
        out["vllm"].append(batch.behaviour_logp[b, : len(toks)].to(logits.device))
    return {k: torch.cat(v).cpu() for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tau", type=float, default=0.5, help="large, so A is visible")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max mean |logp gap| "
                        "(fp32 on both sides: ~5e-7 measured on CPU)")
    parser.add_argument("--weight-sync", default="auto",
                        choices=["auto", "load_weights", "reload_weights"])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hapo_cli.algo import entropy_stats
    from hapo_cli.recipe import VllmConfig
    from hapo_cli.rollout import HFEngine, SamplingSpec
    from hapo_cli.rollout.vllm import VLLMEngine

    if args.model_dir is None:
        import tempfile

        from hapo_cli.models import build_tiny_model, build_tokenizer
        from hapo_cli.recipe import TinyModelConfig

        args.model_dir = tempfile.mkdtemp(prefix="hapo-vllm-smoke-")
        tiny_tok = build_tokenizer()
        torch.manual_seed(0)
        tiny = build_tiny_model(TinyModelConfig(num_heads=2), tiny_tok)  # head_dim 32 for vLLM
        with torch.no_grad():  # random init is near-uniform; spread the entropies
            tiny.get_output_embeddings().weight.mul_(4.0)
        tiny.save_pretrained(args.model_dir)
        tiny_tok.save_pretrained(args.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    texts = ["12+34-5=", "7+8-9=", "The answer is", "1 2 3 4"]
    prompts = [tok(t).input_ids or [tok.eos_token_id] for t in texts]
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + 8
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    hf = hf.to(device).eval()
    engine = VLLMEngine(
        args.model_dir,
        VllmConfig(gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True,
                   weight_sync=args.weight_sync),
        tokenizer=tok,
        max_model_len=max_len,
        dtype="float32",
        seed=0,
    )
    rows, ok = [], True
    plain = SamplingSpec(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    batch = engine.generate(prompts, plain, None, seed=1)
    rec = hf_recompute(hf, prompts, batch, args.temperature, 0.0, None)
    stats = entropy_stats(rec["entropy"], torch.ones_like(rec["entropy"], dtype=torch.bool))
    runs = [("plain T", plain, None, batch, rec)]
    spec_a = SamplingSpec(
        n=args.n,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        adaptive=True,
        tau=args.tau,
    )
    batch_a = engine.generate(prompts, spec_a, stats, seed=1)
    runs.append(
        (
            f"A (tau={args.tau:g})",
            spec_a,
            stats,
            batch_a,
            hf_recompute(hf, prompts, batch_a, args.temperature, args.tau, stats),
        )
    )
    again = engine.generate(prompts, spec_a, stats, seed=1)
    same_seed = torch.equal(again.response_ids, batch_a.response_ids)

    for name, _spec, _stats, b, r in runs:
        gap = (r["vllm"] - r["logp_tt"]).abs()
        gap_base = (r["vllm"] - r["logp_t"]).abs().mean().item()
        rows.append(
            (
                name,
                b.num_tokens,
                r["temp"].min().item(),
                r["temp"].max().item(),
                gap.mean().item(),
                gap.max().item(),
                gap_base,
            )
        )
        ok &= gap.mean().item() < args.tolerance

    # weight sync through sleep/wake: perturb the HF weights, push them; vLLM's log-probs must
    # then match a recomputation with the PERTURBED model (they would not with the disk weights)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sleep()
    engine.sync_weights(hf)
    engine.wake_up()
    synced = engine.generate(prompts, plain, None, seed=2)
    r = hf_recompute(hf, prompts, synced, args.temperature, 0.0, None)
    gap = (r["vllm"] - r["logp_tt"]).abs()
    rows.append(
        (
            "after sync",
            synced.num_tokens,
            args.temperature,
            args.temperature,
            gap.mean().item(),
            gap.max().item(),
            gap.mean().item(),
        )
    )
    ok &= gap.mean().item() < args.tolerance
    greedy = SamplingSpec(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens, greedy=True)
    v_greedy = engine.generate(prompts, greedy, None, 0).response_token_lists()
    h_greedy = HFEngine(hf, tok).generate(prompts, greedy, None, 0).response_token_lists()
    sync_match = sum(a == b for a, b in zip(v_greedy, h_greedy, strict=True)) / len(prompts)

    print(
        f"{'run':<14}{'tokens':>8}{'T_t min':>9}{'T_t max':>9}"
        f"{'|gap| mean':>12}{'|gap| max':>11}{'gap@T mean':>12}"
    )
    for name, n, tmin, tmax, gmean, gmax, gbase in rows:
        print(f"{name:<14}{n:>8}{tmin:>9.4f}{tmax:>9.4f}{gmean:>12.2e}{gmax:>11.2e}{gbase:>12.2e}")
    print(f"same seed -> same tokens: {same_seed}")
    # informational: near-ties may flip an argmax between kernels
    print(f"greedy after sleep + sync_weights equals HF greedy: {sync_match:.0%} of prompts")
    ok &= same_seed
    print(f"device {device}, weight sync via {engine.weight_sync}, "
          f"model runner {'V2' if engine.use_v2 else 'V1'}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
