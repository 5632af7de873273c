"""Reusing the HF engine's behaviour log-probs as old log-probs (learner/oldlogp.py).

The decision is a pure function of facts about the batch; the equality it relies on is measured
here: the learner's scoring pass (fused and unfused head, as `Loop.score` runs it) against the
engine's decode-time values for the same weights. Measured (2 cores, one thread): the random tiny
Qwen2 below, max |d logp| 9.5e-7 and max |d H| 1.0e-6; the cached warm-up policy on 128 `arith`
responses (~2.7k tokens, T = 1, T = 0.7 with top-k, A with `rollout`), max |d logp| 2.2e-5 on
log-probs near -15 (relative 1.5e-6; mean 2e-7) and max |d H| 4.6e-6. That is float32 rounding
of two evaluation orders (KV-cache decode steps vs one full-sequence forward; log_softmax vs the
chunked fused head), 4 orders of magnitude below the clip range's 0.2 in the ratio. The
assertions use `assert_close`'s float32 defaults (rtol 1.3e-6, atol 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hapo_cli.algo import EntropyStats
from hapo_cli.learner.forward import response_logprobs
from hapo_cli.learner.oldlogp import old_logp_source
from hapo_cli.rollout import HFEngine, SamplingSpec


def _facts(**over):
    mask = torch.tensor([[True, True, False], [True, False, False]])
    temps = torch.tensor([[0.7, 0.7, 0.0], [0.7, 0.0, 0.0]])
    base = dict(same_module=True, float32=True, decode_stats=True, policy_temperature="base",
                base_temperature=0.7, temperature=temps, mask=mask)
    return {**base, **over}


def test_reuse_only_when_every_condition_holds():
    assert old_logp_source(**_facts()) == "behaviour"
    for flip in ("same_module", "float32", "decode_stats"):
        assert old_logp_source(**_facts(**{flip: False}, has_base_logp=True)) is None, flip
    # A under `base`: one token sampled hotter than T -> the log-prob at T is needed
    hot = torch.tensor([[0.7, 0.72, 0.0], [0.7, 0.0, 0.0]])
    assert old_logp_source(**_facts(temperature=hot)) is None  # not recorded: score
    assert old_logp_source(**_facts(temperature=hot, has_base_logp=True)) == "base"
    # ... under `rollout` the learner divides by the stored T_t too
    assert old_logp_source(**_facts(temperature=hot, policy_temperature="rollout")) == "behaviour"
    # padding positions (T_t = 0 there) never matter
    assert old_logp_source(**_facts(base_temperature=1.0)) is None


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _learner_inputs(prompts, out, pad_id=0):
    """(input_ids, attention_mask) as TrainBatch builds them: left-padded prompt | response."""
    P = max(len(p) for p in prompts)
    T = out.response_ids.shape[1]
    B = len(out)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    am = torch.zeros((B, P + T), dtype=torch.long)
    for b in range(B):
        p = prompts[int(out.prompt_index[b])]
        ids[b, P - len(p) : P] = torch.tensor(p)
        am[b, P - len(p) : P] = 1
    ids[:, P:] = out.response_ids.masked_fill(~out.response_mask, pad_id)
    am[:, P:] = out.response_mask.long()
    return ids, am


CASES = [
    ("T=1", SamplingSpec(n=4, temperature=1.0, max_new_tokens=12), None, "base"),
    ("T=0.7 top-k", SamplingSpec(n=4, temperature=0.7, top_k=5, max_new_tokens=12), None, "base"),
    ("A rollout", SamplingSpec(n=4, temperature=1.0, max_new_tokens=12, adaptive=True, tau=0.3),
     EntropyStats(rho=0.0, std=1.0, scale_pos=2.0, scale_neg=2.0), "rollout"),
    ("A base", SamplingSpec(n=4, temperature=0.9, max_new_tokens=12, adaptive=True, tau=0.3),
     EntropyStats(rho=0.0, std=1.0, scale_pos=2.0, scale_neg=2.0), "base"),
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name,spec,stats,policy_t", CASES, ids=[c[0] for c in CASES])
def test_behaviour_logp_equals_the_learners_old_logp(name, spec, stats, policy_t, fused):
    model = _model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [4, 4, 3]]
    out = HFEngine(model, None, eos_token_id=1, pad_token_id=0).generate(prompts, spec, stats,
                                                                          seed=5)
    mask = out.response_mask
    source = old_logp_source(
        same_module=True, float32=True, decode_stats=out.decode_stats,
        policy_temperature=policy_t, base_temperature=spec.temperature,
        temperature=out.temperature, mask=mask, has_base_logp=out.base_logp is not None)
    assert source == ("base" if name == "A base" else "behaviour")
    reused = out.base_logp if source == "base" else out.behaviour_logp
    ids, am = _learner_inputs(prompts, out)
    T = out.response_ids.shape[1]
    temp = out.temperature if policy_t == "rollout" else spec.temperature
    with torch.no_grad():
        logp, _ = response_logprobs(model, ids, am, T, temp, fused=fused, chunk_size=16)
        _, ent = response_logprobs(model, ids, am, T, None, fused=fused, chunk_size=16)
    assert_close(reused[mask], logp[mask])
    assert_close(out.entropy[mask], ent[mask])


def _train(tmp_path, cache_dir, recipe, name, steps=2):
    import json

    from conftest import SMALL

    from hapo_cli.learner.trainer import train
    from hapo_cli.recipe import load_recipe

    rec = load_recipe(recipe, [*SMALL, f"model.cache_dir={cache_dir}", f"train.max_steps={steps}",
                               "eval.every=0", "eval.at_start=false", "log.checkpoint_every=0",
                               "log.token_sample_every=0"])
    out = tmp_path / name
    train(rec, output_dir=out, overwrite=True, progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_trainer_reuses_behaviour_logp_and_trains_the_same(tmp_path, cache_dir, monkeypatch):
    reused = _train(tmp_path, cache_dir, "tiny/dapo", "reused", steps=1)
    monkeypatch.setattr("hapo_cli.learner.scoring.reuse_behaviour_logp", lambda *a: None)
    scored = _train(tmp_path, cache_dir, "tiny/dapo", "scored", steps=1)
    r, s = reused[-1], scored[-1]
    assert r["actor/behaviour_logp_gap"] == 0.0  # the same tensor
    assert 0.0 < s["actor/behaviour_logp_gap"] < 1e-5  # recomputed: float32 rounding only
    # same samples (sampled before any update), same update up to that rounding
    for k in ("reward/acc", "rollout/response_len_mean", "adv/pos_token_sum"):
        assert r[k] == s[k], k
    for k in ("actor/pg_loss", "actor/entropy_mean", "actor/grad_norm", "entropy_stats/rho",
              "actor/ratio_mean"):
        assert_close(r[k], s[k], rtol=1e-4, atol=1e-6, msg=k)  # float32 rounding, see top


@pytest.mark.slow
def test_adaptive_temperature_under_base_uses_the_engines_base_logp(tmp_path, cache_dir,
                                                                    monkeypatch):
    rows = [r for r in _train(tmp_path, cache_dir, "tiny/hapo", "hapo") if "actor/pg_loss" in r]
    assert rows[0]["actor/behaviour_logp_gap"] == 0.0  # step 1: no stats yet, T_t = T
    assert rows[1]["actor/behaviour_logp_gap"] > 0.0  # step 2: A samples at T_t != T; old = base
    monkeypatch.setattr("hapo_cli.learner.scoring.reuse_behaviour_logp", lambda *a: None)
    scored = [r for r in _train(tmp_path, cache_dir, "tiny/hapo", "scored") if "actor/pg_loss" in r]
    for r, s in zip(rows, scored):
        for k in ("actor/behaviour_logp_gap", "actor/pg_loss", "actor/entropy_mean",
                  "entropy_stats/rho", "rollout/temperature_mean"):
            assert_close(r[k], s[k], rtol=1e-4, atol=1e-6, msg=k)  # float32 rounding
