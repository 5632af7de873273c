"""Chunked log-probs and entropy vs the naive full-vocabulary formula."""

import math

import pytest
import torch
from torch.testing import assert_close

from hapo_cli.algo import logprobs_and_entropy, token_entropy


def _naive(logits, targets, temperature=None):
    z = logits.float()
    if temperature is not None:
        z = z / (temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, ent


def _inputs(seed, b=3, t=7, v=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=gen)
    temp = 0.5 + torch.rand(b, t, generator=gen)
    return logits, targets, temp


def test_hand_values_uniform():
    # uniform over V = 4: log p = -log 4 for any target, entropy log 4; T does not matter
    logits = torch.zeros(1, 2, 4)
    logp, ent = logprobs_and_entropy(logits, torch.tensor([[0, 3]]), temperature=0.7)
    assert_close(logp, torch.full((1, 2), -math.log(4)))
    assert_close(ent, torch.full((1, 2), math.log(4)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])
@pytest.mark.parametrize("temperature", [None, 0.7, "per-token"])
def test_matches_naive_fp32(seed, chunk_size, temperature):
    logits, targets, temp = _inputs(seed)
    t = temp if temperature == "per-token" else temperature
    logp, ent = logprobs_and_entropy(logits, targets, t, chunk_size=chunk_size)
    ref_logp, ref_ent = _naive(logits, targets, t)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (3, 7)
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)


def test_gradients_match_naive():
    logits, targets, temp = _inputs(3)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    gen = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    logp, ent = logprobs_and_entropy(a, targets, temp, chunk_size=4)  # checkpointed chunks
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    ref_logp, ref_ent = _naive(b, targets, temp)
    ((ref_logp * w1).sum() + (ref_ent * w2).sum()).backward()
    assert_close(a.grad, b.grad)


def test_bf16_logits():
    logits, targets, temp = _inputs(4, dtype=torch.bfloat16)
    logp, ent = logprobs_and_entropy(logits, targets, temp, chunk_size=5)
    ref_logp, ref_ent = _naive(logits, targets, temp)  # same bf16 values, upcast -> fp32 math
    assert logp.dtype == torch.float32
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)
    # vs the fp32 logits they were rounded from: bf16 has 8 mantissa bits (rel. 2^-8 = 0.4 %),
    # logits ~ N(0, 4) -> abs error of a log-prob up to ~0.05; tolerance stated for that reason.
    ref32_logp, _ = _naive(_inputs(4)[0], targets, temp)
    assert_close(logp, ref32_logp, atol=0.1, rtol=0.02)
    lg = logits.clone().requires_grad_()
    out, _ = logprobs_and_entropy(lg, targets, chunk_size=5)
    out.sum().backward()
    assert lg.grad.dtype == torch.bfloat16 and torch.isfinite(lg.grad).all()


def test_untempered_entropy_and_neg_inf_logits():
    logits, targets, temp = _inputs(5)
    logits[:, :, 10:20] = float("-inf")  # e.g. a masked vocabulary slice
    targets = targets % 10
    lg = logits.clone().requires_grad_()
    logp, ent, ent0 = logprobs_and_entropy(lg, targets, temp, chunk_size=6, untempered_entropy=True)
    assert_close(ent0, token_entropy(logits))
    assert_close(ent, _naive(logits, targets, temp)[1])
    (logp.sum() + ent.sum() + ent0.sum()).backward()
    assert torch.isfinite(lg.grad).all()
    assert (lg.grad[:, :, 10:20] == 0).all()


def test_flat_input_and_validation():
    logits, targets, _ = _inputs(6)
    flat_logp, flat_ent = logprobs_and_entropy(logits.reshape(21, 50), targets.reshape(21))
    logp, ent = logprobs_and_entropy(logits, targets)
    assert_close(flat_logp, logp.reshape(21))
    assert_close(flat_ent, ent.reshape(21))
    with pytest.raises(ValueError, match="targets"):
        logprobs_and_entropy(logits, targets[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, targets, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(logits, targets, chunk_size=0)
    empty = logprobs_and_entropy(torch.zeros(0, 4, 8), torch.zeros(0, 4, dtype=torch.long))
    assert empty[0].shape == (0, 4)


def test_no_grad_path_does_not_keep_graph():
    logits, targets, _ = _inputs(7)
    lg = logits.clone().requires_grad_()
    with torch.no_grad():
        logp, _ = logprobs_and_entropy(lg, targets)
    assert not logp.requires_grad


@pytest.mark.parametrize("temperature", [None, 0.8, "per-token"])
def test_gradcheck_float64_all_outputs(temperature):
    # analytic backward (custom autograd Function) vs finite differences, in float64
    logits, targets, temp = _inputs(8, b=2, t=3, v=6, dtype=torch.float64)
    t = temp.double() if temperature == "per-token" else temperature
    lg = logits.clone().requires_grad_()

    def fn(x):
        return logprobs_and_entropy(x, targets, t, chunk_size=4, untempered_entropy=True)

    assert all(o.dtype == torch.float64 for o in fn(lg))
    assert torch.autograd.gradcheck(fn, (lg,))
