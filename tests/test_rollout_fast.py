"""The HF engine's fast decode step (`KVStepper`) against the generic loop (the model's own forward
and cache every token), kept in the engine as the fallback and used here as the reference.

Both run the same ops on the same shapes, so on one machine they agree bit for bit; the tests still
compare floats with `assert_close`'s default float32 tolerances (rtol 1.3e-6, atol 1e-5) and
sampled token ids exactly only where they are determined: up to the first position where the
reference's Gumbel-perturbed scores have a near-tie (top-2 gap < 1e-3, far above float32
rounding of unit-scale logits), so another CPU's kernels (AVX2/AVX-512, thread count) cannot
flip an assertion.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hapo_cli.algo import EntropyStats
from hapo_cli.rollout import HFEngine, SamplingSpec
from hapo_cli.rollout.hf import (
    KVStepper,
    _cache_kwarg,
    fast_decode_supported,
    gumbel_noise,
    left_pad,
)
from hapo_cli.rollout.processors import sampling_processors

TIE = 1e-3


def _model(kind: str = "qwen2", kv_heads: int = 4, attn: str = "sdpa"):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, intermediate_size=64, eos_token_id=1,
                  pad_token_id=0, tie_word_embeddings=True, attn_implementation=attn)
    cfg_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                          "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[kind]
    if kind == "qwen3":
        common["head_dim"] = 8
    model = model_cls(cfg_cls(**common)).eval()
    with torch.no_grad():  # a peaked, non-uniform policy: random init is nearly flat
        model.get_output_embeddings().weight.mul_(8.0)
    return model


MODELS = [("qwen2", 4), ("qwen2", 2), ("qwen3", 4), ("llama", 2)]
PADDED = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [4, 4, 3, 2]]
UNPADDED = [[5, 6, 7], [8, 9, 2], [10, 11, 12]]


def _stepper_matches_forward(model, prompts, steps: int, seed: int) -> None:
    """Teacher-force `steps` tokens through `KVStepper` and through the model's own forward and
    cache (the stepper copies the prefill cache: the reference may keep growing its own)."""
    ids, attn, pos = left_pad(prompts, 0, "cpu")
    fed = torch.randint(2, 24, (len(prompts), steps), generator=torch.Generator().manual_seed(seed))
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    ref_cache = out.past_key_values
    stepper = KVStepper(model, ref_cache, attn, max_new=steps + 1)
    a, nxt = attn, pos[:, -1] + 1
    for t in range(steps):
        got = stepper.step(fed[:, t], nxt)
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        ref = model(input_ids=fed[:, t : t + 1], attention_mask=a, position_ids=nxt.unsqueeze(1),
                    use_cache=True, **{_cache_kwarg(model): ref_cache})
        ref_cache = ref.past_key_values
        assert_close(got, ref.logits[:, -1].float())
        nxt = nxt + 1


@pytest.mark.parametrize("kind,kv", MODELS)
@pytest.mark.parametrize("prompts", [PADDED, UNPADDED], ids=["padded", "unpadded"])
def test_stepper_logits_match_the_models_forward(kind, kv, prompts):
    model = _model(kind, kv)
    assert fast_decode_supported(model)
    with torch.inference_mode():
        _stepper_matches_forward(model, prompts, steps=6, seed=1)


@pytest.mark.parametrize("kind,kv", MODELS)
def test_stepper_under_bf16_autocast_matches_the_models_forward(kind, kv):
    """fp32 master weights computing in bf16 (`train.mixed_precision=bf16`, or `model.dtype=
    bfloat16` on one process): accelerate runs the model's forward under CPU autocast, and the
    engine runs the stepper under the same autocast. The prefill's cache then holds fp32 keys
    (rotated by fp32 cos/sin) and bf16 values; the step must do what the forward does (SDPA casts
    both to bf16), not hand SDPA mixed dtypes (the crash of issue 23). Same ops on the same
    shapes: equal to float32 tolerance although the arithmetic is bf16."""
    model = _model(kind, kv)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        _stepper_matches_forward(model, PADDED, steps=4, seed=2)


def _first_near_tie(model, prompt, row_tokens, temps, spec, key, upto):
    """First position t < upto where the reference's perturbed scores have a top-2 gap < TIE."""
    _, chain = sampling_processors(1.0, 0.0, None, spec.top_k, spec.top_p)
    seq = torch.tensor([prompt + row_tokens[:upto]])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, len(prompt) - 1 :].float()  # (upto+1, V)
    for t in range(upto + 1):
        warped = logits[t : t + 1] / temps[t]
        for w in chain[1:]:
            warped = w(seq, warped)
        top2 = (warped.double() + gumbel_noise(key.view(1), t, warped.shape[-1])).topk(2).values
        if float(top2[0, 0] - top2[0, 1]) < TIE:
            return t
    return None


SPECS = [
    (SamplingSpec(n=3, temperature=1.0, max_new_tokens=10), None),
    (SamplingSpec(n=3, temperature=0.8, top_k=6, top_p=0.9, max_new_tokens=10, adaptive=True,
                  tau=0.3), EntropyStats(rho=0.5, std=0.5, scale_pos=1.5, scale_neg=2.0)),
]


@pytest.mark.parametrize("kind,kv", MODELS)
@pytest.mark.parametrize("spec,stats", SPECS, ids=["plain", "adaptive-topk-topp"])
def test_fast_generate_matches_the_generic_loop(kind, kv, spec, stats):
    from hapo_cli.rollout.hf import sample_keys

    model = _model(kind, kv)
    fast = HFEngine(model, None, eos_token_id=1, pad_token_id=0)
    ref = HFEngine(model, None, eos_token_id=1, pad_token_id=0, fast_decode=False)
    got = fast.generate(PADDED, spec, stats, seed=11)
    want = ref.generate(PADDED, spec, stats, seed=11)
    keys = sample_keys(11, 0, len(PADDED), spec.n)
    rows = [p for p in PADDED for _ in range(spec.n)]
    for b in range(len(want)):
        g_ids, w_ids = got.response_ids[b], want.response_ids[b]
        w_len, g_len = int(want.response_len[b]), int(got.response_len[b])
        same = min(w_len, g_len)
        diff = (g_ids[:same] != w_ids[:same]).nonzero()
        upto = int(diff[0]) if len(diff) else same
        if upto < w_len or w_len != g_len:  # a difference: it must follow a near-tie
            tie = _first_near_tie(model, rows[b], w_ids[:w_len].tolist(),
                                  want.temperature[b], spec, keys[b], min(upto, w_len - 1))
            assert tie is not None and tie <= upto, f"row {b}: tokens differ at {upto} without a tie"
        else:
            assert want.finish_reason[b] == got.finish_reason[b]
        for name in ("behaviour_logp", "entropy", "temperature"):
            assert_close(getattr(got, name)[b, :upto], getattr(want, name)[b, :upto])


def test_fast_decode_falls_back_where_it_does_not_apply():
    assert not fast_decode_supported(_model("qwen2", attn="eager"))
    model = _model("qwen2")
    handle = model.register_forward_pre_hook(lambda m, a: None)  # e.g. FSDP's parameter gather
    assert not fast_decode_supported(model)
    handle.remove()
    assert fast_decode_supported(model)
    # the fallback still samples (generic loop)
    out = HFEngine(_model("qwen2", attn="eager"), None, eos_token_id=1, pad_token_id=0).generate(
        PADDED, SPECS[0][0], None, seed=3)
    assert out.response_ids.shape[0] == 12
