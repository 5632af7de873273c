"""Padding-free packed forwards (`train.packing`) and token-budget micro-batches
(`train.max_tokens_per_micro_batch`): hand-worked packing and partitions, then the packed path
against the padded one on random length mixes (log-probs, entropies, every parameter's gradient).

Tolerance: the two paths run the same arithmetic on different shapes (one row of N real tokens
vs B rows padded to P+T), so float32 matmuls and softmaxes sum in other orders; measured gaps are
~5e-7 on log-probs and ~1e-6 on gradients, so assert_close's float32 defaults (rtol 1.3e-6,
atol 1e-5) hold with margin for values and rtol 1e-5 / atol 1e-5 for gradients (sums over all
tokens of the batch). A mask that leaked across sequences moves log-probs by O(0.1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hapo_cli.errors import HapoError
from hapo_cli.learner.forward import check_packing, pack_rows, response_logprobs
from hapo_cli.learner.microbatch import budget_partitions, karmarkar_karp, plan_micro_batches


def _model(attn: str = "sdpa"):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         tie_word_embeddings=True, attn_implementation=attn)
    model = tf.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # a peaked, non-uniform policy
    return model


def _batch(prompt_lens, resp_lens, seed=0, pad=0):
    """(input_ids, attention_mask, T): left-padded prompts | right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    P, T = max(prompt_lens), max(max(resp_lens), 1)
    B = len(prompt_lens)
    ids = torch.randint(2, 40, (B, P + T), generator=g)
    am = torch.zeros(B, P + T, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        am[b, P - p : P] = 1
        am[b, P : P + r] = 1
    return ids.masked_fill(am == 0, pad), am, T


# ---- packing, by hand --------------------------------------------------------------------------

def test_pack_rows_by_hand():
    # row 0: prompt [5 6] response [7 8 9]; row 1: prompt [4] response [3]; P = 2, T = 3
    ids = torch.tensor([[5, 6, 7, 8, 9],
                        [0, 4, 3, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1],
                       [0, 1, 1, 0, 0]])
    pk = pack_rows(ids, am, 3)
    assert pk.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # response token 7 (packed index 2) is predicted by index 1, 8 by 2, 9 by 3; token 3 (index
    # 6) by index 5, row 1's prompt token: never a position of another sequence
    assert pk.predict_at.tolist() == [1, 2, 3, 5]
    assert pk.targets.tolist() == [7, 8, 9, 3]
    assert pk.response_mask.tolist() == [[True, True, True], [True, False, False]]


def test_pack_rows_refuses_an_empty_prompt():
    ids, am, T = _batch([2, 1], [2, 2])
    am[1, :2] = 0  # row 1 loses its prompt
    with pytest.raises(ValueError, match="empty prompt"):
        pack_rows(ids, am, T)


def test_an_attention_that_cannot_pack_is_one_line():
    model = _model()
    model.config._attn_implementation = "paged|custom"
    with pytest.raises(HapoError, match=r"model qwen2 with attn_implementation='paged\|custom' "
                                        r"cannot pack"):
        check_packing(model)
    check_packing(_model("eager"))  # supported: no error


# ---- Karmarkar-Karp and the token budget, by hand ----------------------------------------------

def test_karmarkar_karp_by_hand():
    # sizes [8 7 6 5 4] (indices 0..4), k = 2. Each item starts as ({item}, {}), spread = size.
    # merge the two largest spreads, pairing the larger part of one with the smaller of the other:
    #   8 with 7       -> {8} | {7}          spread 1
    #   6 with 5       -> {6} | {5}          spread 1
    #   4 with (8|7)   -> {7,4}=11 | {8}=8   spread 3   (ties: the earlier solution first)
    #   (11|8) with (6|5) -> {7,4,5}=16 | {8,6}=14
    # (KK is a heuristic: the optimum is 15 | 15, {8,7} | {6,5,4})
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2)
    assert parts == [[0, 2], [1, 3, 4]]
    assert karmarkar_karp([3], 3) == [[0], [], []]  # more parts than items: empty ones last


def test_budget_uses_the_fewest_parts_that_fit():
    # 14 tokens, budget 10: at least 2 parts; {10} and {1 1 1 1} fit
    parts = budget_partitions([10, 1, 1, 1, 1], 10)
    assert [sorted(p) for p in parts] == [[0], [1, 2, 3, 4]]
    # 6 + 6 + 6 = 18 over budget 10: ceil(18/10) = 2 parts cannot hold three 6s: 3 parts
    assert len(budget_partitions([6, 6, 6], 10)) == 3
    with pytest.raises(ValueError, match="11 tokens is over the micro-batch token budget 10"):
        budget_partitions([11, 1], 10)


def test_plan_pads_a_rank_with_fewer_micro_batches():
    tokens = torch.tensor([5, 5, 5, 5])  # 2 mini-batches of 2 rows
    minis = [slice(0, 2), slice(2, 4)]
    # alone: each mini-batch fits one micro-batch of budget 10
    assert [len(m) for m in plan_micro_batches(tokens, minis, 64, 10)] == [1, 1]
    # another rank needs 3 micro-batches for its first mini-batch: 2 rows -> 2 + 1 empty
    plan = plan_micro_batches(tokens, minis, 64, 10, lambda counts: [3, counts[1]])
    assert [[r.tolist() for r in m] for m in plan] == [[[0], [1], []], [[2, 3]]]
    # by count: consecutive rows, today's grouping
    plan = plan_micro_batches(tokens, minis, 1, None)
    assert [[r.tolist() for r in m] for m in plan] == [[[0], [1]], [[2], [3]]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(50, 120))
def test_budget_partitions_cover_every_row_once_within_budget(tokens, budget):
    parts = budget_partitions(tokens, budget)
    assert sorted(i for p in parts for i in p) == list(range(len(tokens)))
    assert all(sum(tokens[i] for i in p) <= budget for p in parts)
    assert len(parts) >= -(-sum(tokens) // budget)
    # balanced: the largest part is within one sequence of the mean, or the parts are forced
    sums = [sum(tokens[i] for i in p) for p in parts]
    assert max(sums) - min(sums) <= max(tokens) or len(parts) > -(-sum(tokens) // budget)


# ---- packed == padded ----------------------------------------------------------------------------

def _grads(model, ids, am, T, temp, *, fused, packed):
    model.zero_grad(set_to_none=True)
    lp, ent = response_logprobs(model, ids, am, T, temp, fused=fused, packed=packed)
    mask = am[:, -T:].bool()
    # a loss touching every valid token: log-probs and entropies, weighted unevenly
    w = torch.linspace(0.5, 1.5, mask.numel()).view(mask.shape)
    ((lp * w)[mask].sum() + (ent * w)[mask].sum() * 0.1).backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 24)), min_size=1, max_size=7),
       st.sampled_from([True, False]), st.sampled_from(["none", "scalar", "per-token"]),
       st.integers(0, 3), st.sampled_from(["sdpa", "eager"]))
def test_packed_equals_padded_on_random_length_mixes(rows, fused, temp_kind, seed, attn):
    """Prompts of 1-9 tokens (never empty), responses of 0 to 24 (a row with no response token
    still sits in the batch, as an all-masked row does). sdpa models run `varlen_sdpa`
    (per-sequence causal attention), eager ones transformers' block-diagonal packed mask."""
    model = _model(attn)
    ids, am, T = _batch([p for p, _ in rows], [r for _, r in rows], seed)
    temp = {"none": None, "scalar": 0.7,
            "per-token": 0.5 + torch.rand(len(rows), T, generator=torch.Generator().manual_seed(
                seed))}[temp_kind]
    lp_a, en_a, g_a = _grads(model, ids, am, T, temp, fused=fused, packed=False)
    lp_b, en_b, g_b = _grads(model, ids, am, T, temp, fused=fused, packed=True)
    mask = am[:, -T:].bool()
    assert_close(lp_b[mask], lp_a[mask])
    assert_close(en_b[mask], en_a[mask])
    assert (lp_b[~mask] == 0).all() and (en_b[~mask] == 0).all()
    for name in g_a:
        assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packed_attention_never_crosses_a_sequence():
    """A row's log-probs do not depend on what is packed before it: row 1 alone == row 1 after
    row 0 (and changing row 0's tokens changes nothing in row 1)."""
    model = _model()
    ids, am, T = _batch([3, 4], [5, 6])
    with torch.no_grad():
        both, _ = response_logprobs(model, ids, am, T, None, packed=True)
        alone, _ = response_logprobs(model, ids[1:], am[1:], T, None, packed=True)
        ids2 = ids.clone()
        ids2[0, -T:] = (ids2[0, -T:] + 7) % 38 + 2
        other, _ = response_logprobs(model, ids2, am, T, None, packed=True)
    assert_close(both[1], alone[0])
    assert_close(other[1], both[1])


def test_a_budget_below_the_longest_sequence_is_a_load_time_error():
    from hapo_cli.errors import RecipeError
    from hapo_cli.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"train.max_tokens_per_micro_batch=100 must be at "
                                          r"least .* = 544"):
        load_recipe("tiny/hapo", ["train.max_tokens_per_micro_batch=100"])
    r = load_recipe("tiny/hapo", ["train.max_tokens_per_micro_batch=544", "train.packing=true"])
    assert (r.train.max_tokens_per_micro_batch, r.train.packing) == (544, True)
