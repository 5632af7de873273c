"""GRPO and token-level group advantages (component B): hand values, oracle loops, edges."""

import math

import pytest
import torch
from torch.testing import assert_close

from hapo_cli.algo import grpo_advantages, token_level_group_advantages


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_grpo_hand_values():
    # group 0: [1, 0, 1, 1]: mean 0.75, unbiased var = (3 * 0.25^2 + 0.75^2) / 3 = 0.25, std 0.5
    # -> A = [0.5, -1.5, 0.5, 0.5] ; group 9: [2, 4]: mean 3, std sqrt(2) -> -+1/sqrt 2
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 4.0])
    ids = torch.tensor([0, 0, 0, 0, 9, 9])
    s2 = 1 / math.sqrt(2)
    assert_close(grpo_advantages(scores, ids, eps=0.0), torch.tensor([0.5, -1.5, 0.5, 0.5, -s2, s2]))


def test_grpo_group_of_one_and_zero_std():
    # G = 1: mean 0, std 1 (verl) -> 3 / (1 + 1e-6); equal scores: 0
    out = grpo_advantages(torch.tensor([3.0, 1.0, 1.0]), torch.tensor([7, 2, 2]))
    assert_close(out, torch.tensor([3.0 / (1 + 1e-6), 0.0, 0.0]))


def test_token_level_hand_values():
    # group 0: r = [1, 0], lengths [1, 3] -> tokens 1, 0, 0, 0: mu = 1/4,
    # var = (1 * (3/4)^2 + 3 * (1/4)^2) / 4 = 3/16, sigma = sqrt(3)/4 (population std)
    # A = (3/4) / (sqrt3/4) = sqrt3 on the 1 token ; -(1/4)/(sqrt3/4) = -1/sqrt3 on 3 tokens
    # sum: sqrt3 - 3/sqrt3 = 0.
    scores = torch.tensor([1.0, 0.0])
    mask = _mask([1, 3], 4)
    adv = token_level_group_advantages(scores, mask, torch.tensor([0, 0]), eps=0.0)
    r3 = math.sqrt(3)
    assert_close(adv, torch.tensor([[r3, 0, 0, 0], [-1 / r3, -1 / r3, -1 / r3, 0]]))
    assert abs(float(adv.sum())) < 1e-6


def test_token_level_fallback_threshold():
    # r = [1, 0], lengths [1, L]: mu = 1/(L+1), sigma = sqrt(L)/(L+1) -> A_correct = sqrt(L).
    # L = 24: sqrt 24 = 4.90 < 5 keeps token-level ; L = 30: sqrt 30 = 5.48 >= 5 falls back to
    # GRPO: mean 0.5, unbiased std sqrt(0.5) -> +-0.7071 broadcast over valid tokens.
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1])
    mask = _mask([1, 24, 1, 30], 32)
    adv, fb = token_level_group_advantages(scores, mask, ids, eps=0.0, return_fallback=True)
    assert fb.tolist() == [False, True]
    assert adv[0, 0] == pytest.approx(math.sqrt(24), rel=1e-5)
    s2 = 1 / math.sqrt(2)
    assert adv[2, 0] == pytest.approx(s2, rel=1e-5)
    assert_close(adv[3, :30], torch.full((30,), -s2))
    assert (adv[~mask] == 0).all()


def test_token_level_fallback_ignores_padding():
    # the released check also looked at padding positions (value -mu/sigma there); ours must not
    # fall back just because of padding: L = [1, 24] with T = 200 of padding.
    mask = _mask([1, 24], 200)
    _, fb = token_level_group_advantages(torch.tensor([1.0, 0.0]), mask, torch.tensor([3, 3]),
                                         return_fallback=True)
    assert fb.tolist() == [False]


def test_token_level_edges_zero_std_g1_fully_masked_row():
    scores = torch.tensor([1.0, 1.0, 5.0, 0.0, 1.0, 7.0])
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    # group 0 all equal -> 0 ; group 1 single response -> mu = 5, sigma 0 -> 0 ;
    # group 2: row 3 fully masked -> only row 4's tokens count -> 0 ; group 3 fully masked -> 0
    mask = _mask([2, 3, 4, 0, 2, 0], 5)
    adv = token_level_group_advantages(scores, mask, ids)
    assert torch.isfinite(adv).all()
    assert (adv == 0).all()


def test_token_level_fully_masked_row_does_not_change_others():
    scores = torch.tensor([1.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 0])
    with_empty = token_level_group_advantages(scores, _mask([1, 3, 0], 4), ids)
    without = token_level_group_advantages(scores[:2], _mask([1, 3], 4), ids[:2])
    assert_close(with_empty[:2], without)
    assert (with_empty[2] == 0).all()


def test_validation_errors():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_level_group_advantages(torch.zeros(3), torch.ones(2, 4, dtype=torch.bool),
                                     torch.zeros(3, dtype=torch.long))


# ---- oracle tests: vectorised vs the simplest loops -------------------------------------

def _grpo_loop(scores, ids, eps):
    out = torch.empty(len(scores), dtype=torch.float64)
    for g in set(ids.tolist()):
        idx = [i for i in range(len(ids)) if ids[i] == g]
        s = scores[idx].double()
        mean, std = (s.mean(), s.std()) if len(idx) > 1 else (0.0, 1.0)
        out[idx] = (s - mean) / (std + eps)
    return out


def _token_loop(scores, mask, ids, eps, thr):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    grpo = _grpo_loop(scores, ids, eps)
    for g in set(ids.tolist()):
        idx = [i for i in range(len(ids)) if ids[i] == g]
        vals = torch.cat([scores[i].double().repeat(int(mask[i].sum())) for i in idx])
        if vals.numel() == 0:
            continue
        mu, sd = vals.mean(), vals.std(unbiased=False)
        a = {i: (scores[i].double() - mu) / (sd + eps) for i in idx}
        fall = any(abs(a[i]) >= thr for i in idx if mask[i].any())
        for i in idx:
            out[i, mask[i]] = grpo[i] if fall else a[i]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 3), (4, 2, 7), (8, 5, 16), (3, 16, 40)])
def test_oracle_vectorised_vs_loops(seed, dtype, shape):
    prompts, g, t = shape
    gen = torch.Generator().manual_seed(seed)
    b = prompts * g
    perm = torch.randperm(b, generator=gen)
    ids = (torch.arange(b) // g * 37 + 5)[perm]  # shuffled, non-contiguous group ids
    scores = torch.randint(0, 3, (b,), generator=gen).to(dtype) * 0.5  # ties -> zero-std groups
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    eps = 1e-6
    got_grpo = grpo_advantages(scores, ids, eps)
    got_tok = token_level_group_advantages(scores, mask, ids, eps, fallback_threshold=2.0)
    assert got_grpo.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # expected in float64 from the same (possibly bf16-rounded) scores; compare in float64
    # with float32 tolerance because the vectorised code runs in float32 for non-f64 input.
    tol = {} if dtype == torch.float64 else {"rtol": 1.3e-6, "atol": 1e-5}
    assert_close(got_grpo.double(), _grpo_loop(scores, ids, eps), **tol)
    assert_close(got_tok.double(), _token_loop(scores, mask, ids, eps, 2.0), **tol)


def test_zero_std_group_is_exactly_zero_in_float32():
    # 0.1 is inexact in binary: a float32 mean of three 0.1's can miss 0.1 by an ulp, which
    # (r - mean) / (0 + eps) would blow up to ~1e-2; the float64 group moments keep it at 0.
    scores = torch.full((3,), 0.1)
    ids = torch.zeros(3, dtype=torch.long)
    assert (grpo_advantages(scores, ids) == 0).all()
    lengths_mask = _mask([7, 3, 11], 11)
    assert (token_level_group_advantages(scores, lengths_mask, ids) == 0).all()
