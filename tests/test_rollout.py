"""HF rollout engine and the adaptive-temperature LogitsProcessor, on a tiny random Qwen2 model.

Oracles are independent of the engine: a full forward pass over prompt + response (no KV cache,
no padding), hand-written softmax/entropy formulas, and an argmax loop without cache.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hapo_cli.algo import EntropyStats, entropy_stats
from hapo_cli.recipe import AlgoConfig, RolloutConfig
from hapo_cli.rollout import (
    AdaptiveTemperatureLogitsProcessor,
    HFEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingSpec,
    clean_param_name,
)
from hapo_cli.rollout.factory import build_engine

EOS, PAD, VOCAB = 1, 0, 30
PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9], [10], [11, 12]]

warnings.filterwarnings("ignore", message=".*past_key_values.*")


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.5,  # peaky logits: entropies from ~0.3 to ~2.5 nats, EOS is common
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def engine(model) -> HFEngine:
    return HFEngine(model, tokenizer=None, batch_size=64)


def full_forward_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Untempered logits (len(response), V) that predicted each response token: one unpadded
    forward pass over prompt + response, no cache."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P + R, V)
    return logits[len(prompt) - 1 : len(prompt) + len(response) - 1]


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1).float()


def paper_temperature(entropy: torch.Tensor, base: float, tau: float, s: EntropyStats):
    """T_t = T (1 + tau clamp(h, -1, 1)), h = z / scale_pos (z > 0) or z / scale_neg, written
    out by hand (docs/concepts.md) rather than through hapo_cli.algo."""
    z = (entropy.double().clamp_min(s.eps).log() - s.rho) / s.std
    h = torch.where(z > 0, z / s.scale_pos, z / s.scale_neg).clamp(-1, 1)
    return (base * (1 + tau * h)).float()


def rows(batch: RolloutBatch):
    for b in range(len(batch)):
        n = int(batch.response_len[b])
        yield b, batch.response_ids[b, :n].tolist()


# ---------------------------------------------------------------------------------------------
# SamplingSpec
# ---------------------------------------------------------------------------------------------


def test_spec_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingSpec(n=2, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingSpec(n=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="n=0"):
        SamplingSpec(n=0, temperature=1.0)


def test_spec_from_recipe_sections():
    spec = SamplingSpec.for_training(
        RolloutConfig(n=4, temperature=0.9, top_k=5, max_new_tokens=7),
        AlgoConfig(adaptive_temperature=True, tau=0.1),
    )
    assert (spec.n, spec.temperature, spec.top_k, spec.max_new_tokens) == (4, 0.9, 5, 7)
    assert spec.adaptive and spec.tau == 0.1 and spec.truncation


# ---------------------------------------------------------------------------------------------
# the processor
# ---------------------------------------------------------------------------------------------


def test_processor_hand_computed_row():
    # p = [1/4, 1/4, 1/2] -> H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 = 1.039721 nats
    # stats (rho 0, std 1, scales 1): z = ln(1.039721) = 0.038952 -> h = 0.038952
    # T_t = 2 * (1 + 0.5 * 0.038952) = 2.038952; scaled = logits / 2.038952
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    stats = EntropyStats(rho=0.0, std=1.0, scale_pos=1.0, scale_neg=1.0)
    proc = AdaptiveTemperatureLogitsProcessor(2.0, tau=0.5, stats=stats)
    out = proc(torch.zeros(1, 1, dtype=torch.long), logits)
    h = math.log(1.5 * math.log(2))
    t_t = 2.0 * (1 + 0.5 * h)
    torch.testing.assert_close(proc.last_entropy, torch.tensor([1.5 * math.log(2)]))
    torch.testing.assert_close(proc.last_temperature, torch.tensor([t_t]))
    torch.testing.assert_close(out, logits / t_t)


def test_processor_without_stats_is_plain_temperature():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    proc = AdaptiveTemperatureLogitsProcessor(0.7, tau=0.5, stats=None)
    out = proc(None, logits)
    torch.testing.assert_close(out, logits / 0.7)
    torch.testing.assert_close(proc.last_temperature, torch.full((5,), 0.7))
    torch.testing.assert_close(proc.last_entropy, naive_entropy(logits))


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


def test_shapes_masks_and_finish_reasons(engine):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=6)
    batch = engine.generate(PROMPTS, spec, None, seed=0)
    b, t = batch.response_ids.shape
    assert b == len(PROMPTS) * 3 and t <= 6
    for name in ("response_mask", "behaviour_logp", "temperature", "entropy"):
        assert getattr(batch, name).shape == (b, t)
    assert batch.response_mask.dtype == torch.bool
    assert batch.behaviour_logp.dtype == torch.float32
    assert batch.response_len.tolist() == batch.response_mask.sum(-1).tolist()
    assert set(batch.finish_reason) == {"eos", "length"}  # this seed produces both
    for i, toks in rows(batch):
        if batch.finish_reason[i] == "eos":
            assert toks[-1] == EOS and EOS not in toks[:-1]  # EOS is a valid (masked-in) token
        else:
            assert len(toks) == 6 and EOS not in toks
    pad = ~batch.response_mask
    assert (batch.response_ids[pad] == PAD).all()
    for name in ("behaviour_logp", "temperature", "entropy"):
        assert (getattr(batch, name)[pad] == 0).all()
    assert (batch.behaviour_logp[batch.response_mask] < 0).all()
    assert batch.decode_stats and not batch.logp_includes_truncation


def test_same_seed_same_batch_different_seed_different(engine):
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=8)
    a = engine.generate(PROMPTS, spec, None, seed=7)
    b = engine.generate(PROMPTS, spec, None, seed=7)
    c = engine.generate(PROMPTS, spec, None, seed=8)
    torch.testing.assert_close(a.response_ids, b.response_ids, rtol=0, atol=0)
    torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp, rtol=0, atol=0)
    assert a.finish_reason == b.finish_reason
    assert not torch.equal(a.response_ids, c.response_ids)


def test_samples_of_a_prompt_are_adjacent(engine):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=4, greedy=True)
    batch = engine.generate(PROMPTS, spec, None, seed=0)
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # greedy: the three copies of a prompt are identical, and distinct prompts' answers are
    # looked up by prompt_index
    toks = batch.response_token_lists()
    for g in range(len(PROMPTS)):
        assert toks[3 * g] == toks[3 * g + 1] == toks[3 * g + 2]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.8)])
def test_behaviour_logp_matches_full_forward_fixed_temperature(model, engine, top_k, top_p):
    # behaviour_logp = log_softmax(logits / T)[y] BEFORE truncation, also when top-k/top-p ran
    spec = SamplingSpec(n=2, temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=8)
    batch = engine.generate(PROMPTS, spec, None, seed=3)
    assert batch.truncation == (top_k > 0)
    for b, toks in rows(batch):
        logits = full_forward_logits(model, PROMPTS[int(batch.prompt_index[b])], toks)
        y = torch.tensor(toks)
        logp = torch.log_softmax(logits / 0.7, -1).gather(1, y[:, None]).squeeze(1)
        n = len(toks)
        torch.testing.assert_close(batch.behaviour_logp[b, :n], logp)
        torch.testing.assert_close(batch.temperature[b, :n], torch.full((n,), 0.7))
        # the stored entropy is of the UNTEMPERED distribution, not of logits / 0.7
        torch.testing.assert_close(batch.entropy[b, :n], naive_entropy(logits))


def test_behaviour_logp_matches_full_forward_adaptive_temperature(model, engine):
    first = engine.generate(PROMPTS, SamplingSpec(n=4, temperature=1.0, max_new_tokens=8), None, 0)
    stats = entropy_stats(first.entropy, first.response_mask, pivot=0.8)
    tau = 0.5  # large, so T_t visibly varies between 0.6 and 1.5 around T = 1.2
    spec = SamplingSpec(n=3, temperature=1.2, max_new_tokens=8, adaptive=True, tau=tau)
    batch = engine.generate(PROMPTS, spec, stats, seed=5)
    valid_temps = batch.temperature[batch.response_mask]
    assert valid_temps.min() < 1.1 and valid_temps.max() > 1.3
    for b, toks in rows(batch):
        logits = full_forward_logits(model, PROMPTS[int(batch.prompt_index[b])], toks)
        ent = naive_entropy(logits)
        temps = paper_temperature(ent, 1.2, tau, stats)
        y = torch.tensor(toks)
        logp = torch.log_softmax(logits / temps[:, None], -1).gather(1, y[:, None]).squeeze(1)
        n = len(toks)
        torch.testing.assert_close(batch.entropy[b, :n], ent)
        torch.testing.assert_close(batch.temperature[b, :n], temps)
        torch.testing.assert_close(batch.behaviour_logp[b, :n], logp)


def test_adaptive_without_stats_is_plain_temperature(engine):
    plain = engine.generate(PROMPTS, SamplingSpec(n=2, temperature=0.8, max_new_tokens=6), None, 1)
    spec_a = SamplingSpec(n=2, temperature=0.8, max_new_tokens=6, adaptive=True, tau=0.5)
    first_step = engine.generate(PROMPTS, spec_a, None, 1)
    torch.testing.assert_close(plain.response_ids, first_step.response_ids, rtol=0, atol=0)
    torch.testing.assert_close(plain.temperature, first_step.temperature)


def test_greedy_equals_argmax_decoding_without_cache(model, engine):
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=6, greedy=True)
    batch = engine.generate(PROMPTS, spec, None, seed=0)
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        expected = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            expected.append(nxt)
            seq.append(nxt)
            if nxt == EOS:
                break
        assert batch.response_token_lists()[b] == expected
        n = len(expected)
        torch.testing.assert_close(batch.temperature[b, :n], torch.ones(n))


def test_left_padding_matches_unpadded_single_prompts(engine):
    # PROMPTS have lengths 3, 5, 1, 2: batched, all but the longest are left-padded
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=8, greedy=True)
    batched = engine.generate(PROMPTS, spec, None, seed=0)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], spec, None, seed=0)
        assert batched.response_token_lists()[i] == alone.response_token_lists()[0]
        n = int(alone.response_len[0])
        torch.testing.assert_close(batched.behaviour_logp[i, :n], alone.behaviour_logp[0, :n])


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(
        PROMPTS, SamplingSpec(n=2, temperature=1.0, max_new_tokens=6, greedy=True), None, 0
    )
    top1 = engine.generate(
        PROMPTS, SamplingSpec(n=2, temperature=0.9, top_k=1, max_new_tokens=6), None, 4
    )
    assert top1.response_token_lists() == greedy.response_token_lists()


def test_chunking_does_not_change_greedy_results(model):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=6, greedy=True)
    whole = HFEngine(model, batch_size=64).generate(PROMPTS, spec, None, 0)
    chunked = HFEngine(model, batch_size=5).generate(PROMPTS, spec, None, 0)  # 12 rows: 5+5+2
    assert whole.response_token_lists() == chunked.response_token_lists()
    assert whole.finish_reason == chunked.finish_reason


def test_train_mode_restored_and_no_grad_state(model, engine):
    model.train()
    engine.generate(PROMPTS[:1], SamplingSpec(n=2, temperature=1.0, max_new_tokens=3), None, 0)
    assert model.training
    model.eval()
    engine.generate(PROMPTS[:1], SamplingSpec(n=2, temperature=1.0, max_new_tokens=3), None, 0)
    assert not model.training


def test_empty_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[2], []], SamplingSpec(n=1, temperature=1.0), None, 0)


def test_batch_helpers(engine):
    batch = engine.generate(PROMPTS, SamplingSpec(n=2, temperature=1.0, max_new_tokens=5), None, 0)
    assert batch.to("cpu").response_ids.device.type == "cpu"

    class CharTok:
        def batch_decode(self, seqs, skip_special_tokens=True):
            return [
                "".join(chr(97 + t) for t in s if not (skip_special_tokens and t == EOS))
                for s in seqs
            ]

    texts = batch.decode(CharTok())
    assert len(texts) == len(batch) and all(isinstance(t, str) for t in texts)


def test_sync_weights(model):
    engine = HFEngine(model, batch_size=8)
    engine.sync_weights(model)  # same object: no-op
    other = tiny_model(seed=1)
    target = tiny_model(seed=2)
    eng2 = HFEngine(target, batch_size=8)
    eng2.sync_weights(other)
    for (_, a), (_, b) in zip(other.named_parameters(), target.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eng2.sync_weights((f"module.{n}", p * 0) for n, p in model.named_parameters())
    assert all((p == 0).all() for p in target.parameters())


def test_sync_from_after_an_update(model):
    """The learner's one call after each step: a no-op when the engine samples with the
    learner's module (also through a DDP-style `.module` wrapper), a full copy otherwise."""
    engine = HFEngine(model, batch_size=8)
    before = {n: p.clone() for n, p in model.named_parameters()}
    wrapper = torch.nn.Module()
    wrapper.module = model
    engine.sync_from(wrapper)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    learner, copy = tiny_model(seed=1), tiny_model(seed=2)
    HFEngine(copy, batch_size=8).sync_from(learner)
    for (_, a), (_, b) in zip(learner.named_parameters(), copy.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_clean_param_name():
    assert clean_param_name("module._orig_mod.model.embed_tokens.weight") == (
        "model.embed_tokens.weight"
    )
    assert clean_param_name("model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert clean_param_name("lm_head.weight") == "lm_head.weight"


def test_build_engine_hf_and_vllm_errors(model):
    engine = build_engine(RolloutConfig(engine="hf", batch_size=16), model, None, None)
    assert isinstance(engine, HFEngine) and engine.batch_size == 16
    assert isinstance(engine, RolloutEngine)
    with pytest.raises(ValueError, match="saved model directory"):
        build_engine(RolloutConfig(engine="vllm"), model, None, None)
