"""Tied embeddings on the fused path (hapo_cli/learner/tied_grad.py): the lookup's gradient is
added into the head's in place instead of as a dense (V, d) tensor. The gradients equal the
plain path's bit for bit (autograd's dense lookup gradient added into the head's), with and
without a padding row, padded and packed, over two accumulated micro-batches; other embeddings keep their own
forward. The memory it saves is measured in bench/bench_strategy.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hapo_cli.learner import forward as fw
from hapo_cli.learner import tied_grad


def _model(pad: int | None, tie: bool = True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=29, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie,
                      pad_token_id=pad)
    return Qwen2ForCausalLM(cfg).float()


def _grads(model, batches, monkeypatch, tied: bool, engaged: list[bool], packed: bool):
    lookup = tied_grad._Lookup

    class Spy(lookup):
        @staticmethod
        def backward(ctx, *grads):
            engaged.append(ctx.channel.head is not None)
            return lookup.backward(ctx, *grads)

    with monkeypatch.context() as m:
        m.setattr(tied_grad, "_Lookup", Spy)
        if not tied:
            m.setattr(fw, "plain_tied_embedding", lambda *a: None)
        model.zero_grad(set_to_none=True)
        for ids, am in batches:  # two micro-batches accumulate into .grad
            lp, _ = fw.response_logprobs(model, ids, am, 6, None, fused=True, chunk_size=5,
                                         entropy=False, packed=packed)
            (-lp.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("pad", [None, 0])
def test_tied_gradients_equal_the_plain_path(monkeypatch, pad, packed):
    model = _model(pad)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 6, (3, 14), generator=g)  # 6 ids: rows repeat many times,
        ids[2, 1] = 0  # and id 0 (pad_token_id=0: nn.Embedding's padding row) at a real token
        am = torch.ones_like(ids)
        ids[0, :2], am[0, :2] = 0, 0  # left-padded prompt
        am[1, -3:] = 0  # right-padded response
        batches.append((ids, am))
    engaged: list[bool] = []
    plain = _grads(model, batches, monkeypatch, False, engaged, packed)
    assert engaged == []  # the plain path: the module's own forward
    tied = _grads(model, batches, monkeypatch, True, engaged, packed)
    assert engaged == [True, True]  # each backward added into the head's gradient
    assert plain.keys() == tied.keys()
    for k in plain:
        assert torch.equal(tied[k], plain[k]), k
    w = "model.embed_tokens.weight"
    if pad is not None:  # the padding row's gradient: the head's alone, no lookup part
        assert torch.count_nonzero(tied[w][pad]) > 0


def test_lookup_without_the_heads_gradient_returns_the_dense_one():
    """Where the head's gradient did not come (e.g. W used only by the lookup), the backward
    returns autograd's dense gradient."""
    torch.manual_seed(0)
    w1 = torch.randn(11, 4, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    ids = torch.tensor([[3, 3, 0, 7], [10, 3, 1, 0]])
    up = torch.randn(2, 4, 4)
    tied_grad._Lookup.apply(ids, w1, 0, tied_grad.TiedGradient()).backward(up)
    F.embedding(ids, w2, padding_idx=0).backward(up)
    assert w1.grad is not None and torch.equal(w1.grad, w2.grad)


def test_only_plain_tied_embeddings_take_the_path():
    tied = _model(None)
    head = tied.get_output_embeddings()
    assert tied_grad.plain_tied_embedding(tied, head) is tied.get_input_embeddings()
    untied = _model(None, tie=False)
    assert tied_grad.plain_tied_embedding(untied, untied.get_output_embeddings()) is None
    for attr, value in (("scale_grad_by_freq", True), ("sparse", True), ("max_norm", 1.0)):
        emb = tied.get_input_embeddings()
        old = getattr(emb, attr)
        setattr(emb, attr, value)
        assert tied_grad.plain_tied_embedding(tied, head) is None, attr
        setattr(emb, attr, old)

    class Scaled(nn.Embedding):  # e.g. Gemma3's scaled embedding: its own forward
        pass

    scaled = Scaled(29, 16)
    scaled.weight = head.weight
    tied.set_input_embeddings(scaled)
    assert tied_grad.plain_tied_embedding(tied, head) is None
