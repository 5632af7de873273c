"""Chunked (fused LM-head) log-probs and entropy == the naive full-logits formula."""

import math

import pytest
import torch

from hapo_cli.algo.fused import (
    IGNORE_INDEX,
    fused_logprobs_and_entropy,
)

N, D, V = 23, 8, 50  # 23 tokens: prime, so most chunk sizes do not divide it


def naive(hidden, weight, targets, temperature=None, bias=None):
    """The reference formula: full (N, V) float logits, log_softmax, gather, -sum p log p."""
    raw = hidden @ weight.T if bias is None else hidden @ weight.T + bias  # (N, V)
    z = raw.to(torch.float64 if raw.dtype == torch.float64 else torch.float32)
    if temperature is not None:
        t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(temperature)
        z = z / (t[:, None] if t.dim() else t)
    logp_all = z.log_softmax(-1)  # (N, V)
    valid = targets != IGNORE_INDEX
    logp = logp_all.gather(-1, targets.clamp(min=0)[:, None])[:, 0]  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp.masked_fill(~valid, 0.0), entropy.masked_fill(~valid, 0.0)


def make_inputs(seed, dtype=torch.float32, with_bias=False, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE_INDEX
    a = torch.randn(N, generator=g)  # loss = sum(a * logp + b * entropy)
    b = torch.randn(N, generator=g)
    return hidden, weight, bias, targets, a, b


def values_and_grads(fn, hidden, weight, bias, a, b):
    params = [hidden, weight] + ([bias] if bias is not None else [])
    logp, entropy = fn()
    loss = (a.to(logp.dtype) * logp + b.to(logp.dtype) * entropy).sum()
    grads = torch.autograd.grad(loss, params)
    return logp.detach(), entropy.detach(), grads


# ----------------------------------------------------------------------------- hand values


def test_hand_computed_two_token_vocab():
    # d = 1, V = 2: logits = h * W = [0, ln 3] -> p = [1/4, 3/4]
    # logp(target 1) = ln(3/4) = -0.287682; logp(target 0) = ln(1/4) = -1.386294
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    hidden = torch.tensor([[1.0], [1.0], [2.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    # row 2: h = 2, T = 2 -> logits [0, 2 ln 3] / 2 = [0, ln 3]: the same distribution
    temperature = torch.tensor([1.0, 1.0, 2.0])
    logp, entropy = fused_logprobs_and_entropy(
        hidden, weight, torch.tensor([1, 0, 1]), temperature, chunk_size=2
    )
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75), math.log(0.25), math.log(0.75)]))
    torch.testing.assert_close(entropy, torch.tensor([h, h, h]))


def test_hand_computed_entropy_gradient():
    # one row, d = 1, W = [[0], [1]], h = x -> z = [0, x]; at x = 0, p = [1/2, 1/2]
    # H(x) = lse - sum p z; dH/dz_j = -p_j (z_j - sum p z) = -1/2 (z_j - 0) = [0, 0] at x = 0
    # at x = ln 3: p = [1/4, 3/4], sum p z = 3/4 ln 3 = 0.823959
    #   dH/dz = [-1/4 (0 - 0.823959), -3/4 (ln 3 - 0.823959)] = [0.205990, -0.205990]
    #   dH/dx = dH/dz_1 * W_1 = -0.205990
    weight = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[math.log(3.0)]], requires_grad=True)
    _, entropy = fused_logprobs_and_entropy(x, weight, torch.tensor([0]))
    (grad,) = torch.autograd.grad(entropy.sum(), [x])
    want = -0.75 * (math.log(3.0) - 0.75 * math.log(3.0))
    torch.testing.assert_close(grad, torch.tensor([[want]]))
    torch.testing.assert_close(grad, torch.tensor([[-0.205990]]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 64])  # 4, 7 do not divide 23; 64 >= N
@pytest.mark.parametrize("temperature", [None, 0.7, "per-token"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_fp32(chunk_size, temperature, with_bias):
    hidden, weight, bias, targets, a, b = make_inputs(0, with_bias=with_bias, n_ignored=3)
    if temperature == "per-token":
        temperature = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5
    got = values_and_grads(
        lambda: fused_logprobs_and_entropy(
            hidden, weight, targets, temperature, chunk_size, bias=bias
        ),
        hidden, weight, bias, a, b,
    )
    want = values_and_grads(
        lambda: naive(hidden, weight, targets, temperature, bias), hidden, weight, bias, a, b
    )
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logp_only_and_entropy_only_gradients(seed):
    # a loss that uses only one output: the other's upstream gradient is None in backward
    hidden, weight, _, targets, _, _ = make_inputs(seed, n_ignored=2)
    for pick in (0, 1):
        out = fused_logprobs_and_entropy(hidden, weight, targets, 1.3, chunk_size=5)
        got = torch.autograd.grad(out[pick].sum(), [hidden, weight])
        ref = naive(hidden, weight, targets, 1.3)[pick]
        want = torch.autograd.grad(ref.sum(), [hidden, weight])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_compute_entropy_false_gives_zero_entropy_and_same_logp():
    hidden, weight, _, targets, a, _ = make_inputs(3)
    logp, entropy = fused_logprobs_and_entropy(
        hidden, weight, targets, chunk_size=6, compute_entropy=False
    )
    assert torch.count_nonzero(entropy) == 0
    want_logp, _ = naive(hidden, weight, targets)
    torch.testing.assert_close(logp, want_logp)
    got = torch.autograd.grad((a * logp).sum(), [hidden, weight])
    want = torch.autograd.grad((a * want_logp).sum(), [hidden, weight])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_ignored_rows_are_zero_and_inert():
    hidden, weight, _, targets, a, b = make_inputs(4, n_ignored=5)
    ignored = targets == IGNORE_INDEX
    logp, entropy = fused_logprobs_and_entropy(hidden, weight, targets, chunk_size=4)
    assert torch.count_nonzero(logp[ignored]) == 0 and torch.count_nonzero(entropy[ignored]) == 0
    grad_h, _ = torch.autograd.grad((a * logp + b * entropy).sum(), [hidden, weight])
    assert torch.count_nonzero(grad_h[ignored]) == 0
    # changing the hidden state of an ignored row changes nothing
    moved = hidden.detach().clone()
    moved[ignored] += 100.0
    logp2, entropy2 = fused_logprobs_and_entropy(moved, weight, targets, chunk_size=4)
    torch.testing.assert_close(logp2, logp)
    torch.testing.assert_close(entropy2, entropy)


def test_no_grad_paths_save_nothing_and_agree():
    hidden, weight, _, targets, _, _ = make_inputs(5)
    want = naive(hidden, weight, targets, 0.9)
    with torch.no_grad():
        out = fused_logprobs_and_entropy(hidden, weight, targets, 0.9, chunk_size=8)
    assert out[0].grad_fn is None
    detached = fused_logprobs_and_entropy(hidden.detach(), weight.detach(), targets, 0.9)
    assert detached[0].grad_fn is None
    for got in (out, detached):
        torch.testing.assert_close(got[0], want[0].detach())
        torch.testing.assert_close(got[1], want[1].detach())


def test_only_weight_requires_grad():
    hidden, weight, _, targets, a, b = make_inputs(6)
    hidden = hidden.detach()
    logp, entropy = fused_logprobs_and_entropy(hidden, weight, targets, chunk_size=5)
    (got,) = torch.autograd.grad((a * logp + b * entropy).sum(), [weight])
    want_logp, want_ent = naive(hidden, weight, targets)
    (want,) = torch.autograd.grad((a * want_logp + b * want_ent).sum(), [weight])
    torch.testing.assert_close(got, want)


def test_zero_rows():
    # N = 0 (e.g. a micro-batch whose responses are all masked): empty outputs, zero grads
    weight = torch.randn(V, D, requires_grad=True)
    hidden = torch.zeros(0, D, requires_grad=True)
    logp, entropy = fused_logprobs_and_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and entropy.shape == (0,)
    (grad_w,) = torch.autograd.grad((logp.sum() + entropy.sum()), [weight])
    assert torch.count_nonzero(grad_w) == 0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, IGNORE_INDEX, 3, 3])
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.8], dtype=torch.float64)

    def fn(h, w, bb):
        return fused_logprobs_and_entropy(h, w, targets, temperature, chunk_size=2, bias=bb)

    assert fn(hidden, weight, bias)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_bf16_close_to_naive_bf16():
    # bf16 inputs: both paths round each logit to bf16 (8 bits of mantissa: relative error up to
    # 2^-8 = 0.0039) before upcasting, and the chunked matmuls may round a logit differently from
    # the single big one (blocking order), so logits may differ by ~1 bf16 ulp (|z| <= ~6 here:
    # ulp 0.03). logp and entropy inherit that; grads are rounded to bf16 too (grad_W per chunk).
    # Hence atol/rtol 5e-2 instead of the fp32 defaults. The second check is the real claim:
    # against a float64 truth on the same (bf16-valued) inputs, fused is as accurate as naive.
    hidden, weight, _, targets, a, b = make_inputs(8, dtype=torch.bfloat16, n_ignored=2)
    got = values_and_grads(
        lambda: fused_logprobs_and_entropy(hidden, weight, targets, 0.8, chunk_size=5),
        hidden, weight, None, a, b,
    )
    want = values_and_grads(lambda: naive(hidden, weight, targets, 0.8), hidden, weight, None, a, b)
    assert got[0].dtype == torch.float32 and got[2][1].dtype == torch.bfloat16
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]), strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    truth = values_and_grads(lambda: naive(h64, w64, targets, 0.8), h64, w64, None, a, b)
    for i in (0, 1):
        err_fused = (got[i].double() - truth[i]).abs().max()
        err_naive = (want[i].double() - truth[i]).abs().max()
        assert err_fused <= 2 * err_naive + 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=torch.zeros(2, 3, 4)), "hidden must be"),
        (dict(weight=torch.zeros(5, 2)), "lm_head_weight must be"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), "targets must be"),
        (dict(targets=torch.zeros(2)), "targets must be"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(temperature=torch.ones(3)), "temperature must be"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(bias=torch.zeros(4)), "bias must be"),
        (dict(weight=torch.zeros(5, 3, dtype=torch.float64)), "share a dtype"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(
        hidden=torch.zeros(2, 3), weight=torch.zeros(5, 3),
        targets=torch.zeros(2, dtype=torch.long), temperature=None, chunk_size=4, bias=None,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_logprobs_and_entropy(
            args["hidden"], args["weight"], args["targets"], args["temperature"],
            args["chunk_size"], bias=args["bias"],
        )

