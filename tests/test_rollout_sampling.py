"""Counter-based sampling in the HF engine: correct distribution, shard and chunk invariance."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from hapo_cli.rollout import HFEngine, SamplingSpec
from hapo_cli.rollout.hf import gumbel_sample, sample_keys


def test_gumbel_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])  # last token filtered
    probs = torch.softmax(logits, -1)[0]
    n = 20000
    keys = sample_keys(seed=3, prompt_offset=0, num_prompts=1, n=n)
    draws = gumbel_sample(logits.expand(n, -1), keys, step=0)  # (n,)
    freq = torch.bincount(draws, minlength=5).double() / n
    # binomial std of a frequency <= sqrt(0.25 / n) = 0.0035; allow 4 std
    assert_close(freq, probs.double(), atol=0.015, rtol=0)
    assert freq[4] == 0
    # different steps give independent draws for the same key
    other = gumbel_sample(logits.expand(n, -1), keys, step=1)
    assert (other != draws).float().mean() > 0.3


def test_sample_keys_are_distinct_and_shard_consistent():
    k = sample_keys(seed=1, prompt_offset=0, num_prompts=8, n=4)
    assert k.unique().numel() == 32
    # prompts 4..7 seen from a second rank (offset 4) get the same keys
    assert_close(sample_keys(1, 4, 4, 4), k[16:])
    assert not torch.equal(sample_keys(2, 0, 8, 4), k)


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def test_samples_do_not_depend_on_sharding_or_chunking():
    model = _model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [4, 4]]
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=8)
    whole = HFEngine(model, None, batch_size=64, eos_token_id=1, pad_token_id=0).generate(
        prompts, spec, None, seed=7)
    # two "ranks", each with half the prompts and its offset, and a small chunk size
    small = HFEngine(model, None, batch_size=4, eos_token_id=1, pad_token_id=0)
    halves = [small.generate(prompts[:2], spec, None, seed=7, prompt_offset=0),
              small.generate(prompts[2:], spec, None, seed=7, prompt_offset=2)]
    T = 8
    pad = torch.nn.functional.pad
    got_ids = torch.cat([pad(h.response_ids, (0, T - h.response_ids.shape[1])) for h in halves])
    got_mask = torch.cat([pad(h.response_mask, (0, T - h.response_mask.shape[1])) for h in halves])
    got_lp = torch.cat([pad(h.behaviour_logp, (0, T - h.behaviour_logp.shape[1])) for h in halves])
    w = whole.response_ids.shape[1]
    assert torch.equal(got_mask[:, :w], whole.response_mask)
    assert torch.equal(got_ids[:, :w][whole.response_mask], whole.response_ids[whole.response_mask])
    # log-probs agree to float tolerance (different padding widths change the sums' order)
    assert_close(got_lp[:, :w][whole.response_mask], whole.behaviour_logp[whole.response_mask],
                 rtol=1e-4, atol=1e-5)
