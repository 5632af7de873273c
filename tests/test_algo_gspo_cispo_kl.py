"""GSPO, CISPO, the KL penalty and Dr. GRPO's advantages: values and gradients worked by hand,
the edges (length-1 responses, all-masked rows, ratios far outside the clip range), and
invariance to what sits under mask = 0."""

from __future__ import annotations

import math

import pytest
import torch

from analysis import schema
from hapo_cli import algo

LN2 = math.log(2.0)


def _leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


# ---- kl_penalty ----


def test_kl_estimators_values_and_gradients_by_hand():
    # d = logp - ref = ln 2 (pi = 2 pi_ref) on the first token, 0 on the second
    logp = _leaf([[LN2, -1.0]])
    ref = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    want = {
        "k1": ([LN2, 0.0], [1.0, 1.0]),  # d; grad 1
        "k2": ([0.5 * LN2**2, 0.0], [LN2, 0.0]),  # d^2/2; grad d
        # e^{-d} + d - 1 = 0.5 + ln2 - 1; grad 1 - e^{-d} = 0.5
        "k3": ([0.5 + LN2 - 1, 0.0], [0.5, 0.0]),
        "k3+": ([0.5 + LN2 - 1, 0.0], [LN2, 0.0]),  # k3's value, k2's gradient
    }
    for kind, (value, grad) in want.items():
        logp.grad = None
        kl = algo.kl_penalty(logp, ref, kind)
        kl.sum().backward()
        torch.testing.assert_close(kl.detach(), torch.tensor([value], dtype=torch.float64))
        torch.testing.assert_close(logp.grad, torch.tensor([grad], dtype=torch.float64))


def test_kl_is_zero_against_itself_and_k3_is_clamped_far_away():
    x = torch.randn(3, 5)
    for kind in algo.KL_ESTIMATORS:
        assert torch.equal(algo.kl_penalty(x, x, kind), torch.zeros(3, 5))
    # d = -30: exp(clamp(30, max 20)) - 20 - 1 is ~4.9e8, clamped to 10
    far = algo.kl_penalty(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3")
    assert far.item() == 10.0
    assert torch.isfinite(far).all()
    with pytest.raises(ValueError, match="k4.*one of: k1, k2, k3, k3\\+"):
        algo.kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        algo.kl_penalty(x, x[:2], "k1")


# ---- gspo_policy_loss ----


def test_gspo_sequence_ratio_value_and_gradient_by_hand():
    # row 0: two tokens with log-ratios ln2 and 0 -> s_0 = exp(ln2 / 2) = sqrt 2, A = +1;
    # row 1: one token (length 1), log-ratio -ln2 -> s_1 = 0.5, A = -1; third column padding
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    logp = _leaf([[-1.0 + LN2, -2.0, 5.0], [-1.0 - LN2, 7.0, 7.0]])
    adv = torch.tensor([[1.0, 1.0, 9.0], [-1.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # wide bounds: nothing clipped; L_0t = -sqrt2, L_1 = +0.5; seq-mean-token-mean over 2 rows
    loss, m = algo.gspo_policy_loss(logp, old, adv, mask, 0.9, 0.9)
    want = (-math.sqrt(2) + 0.5) / 2
    torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=torch.float64))
    loss.backward()
    # d/dlogp_it = -A_i s_i / |y_i| / rows: row 0: -sqrt2/2/2 each; row 1: 0.5/1/2
    g = torch.tensor([[-math.sqrt(2) / 4, -math.sqrt(2) / 4, 0.0], [0.25, 0.0, 0.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(logp.grad, g)
    torch.testing.assert_close(m[schema.RATIO_MEAN].double(),
                               torch.tensor((2 * math.sqrt(2) + 0.5) / 3, dtype=torch.float64))
    assert m[schema.CLIP_FRAC_HIGH] == 0 and m[schema.CLIP_FRAC_LOW] == 0


def test_gspo_clips_whole_sequences_far_outside_the_range():
    # same rows, GSPO's ranges 3e-4 / 4e-4: s_0 = sqrt2 > 1 + 4e-4 with A > 0 -> clipped, no
    # gradient; s_1 = 0.5 < 1 - 3e-4 with A < 0 -> clipped, no gradient
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]], dtype=torch.float64)
    logp = _leaf([[-1.0 + LN2, -2.0], [-1.0 - LN2, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, m = algo.gspo_policy_loss(logp, old, adv, mask, 3e-4, 4e-4)
    want = (-(1 + 4e-4) + (1 - 3e-4)) / 2  # -clip(s) A, per-row token mean, mean over rows
    torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=torch.float64))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    torch.testing.assert_close(m[schema.CLIP_FRAC_HIGH], torch.tensor(2 / 3))  # row 0's tokens
    torch.testing.assert_close(m[schema.CLIP_FRAC_LOW], torch.tensor(1 / 3))


def test_gspo_all_masked_row_and_masked_values_change_nothing():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, m = algo.gspo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    noise = torch.where(mask, torch.zeros(3, 4), torch.randn(3, 4) * 100)
    loss2, _ = algo.gspo_policy_loss(logp + noise, old - noise, adv + noise, mask, 0.2, 0.2)
    torch.testing.assert_close(loss, loss2)
    assert torch.isfinite(loss) and m[schema.VALID_TOKENS] == 6
    # the loss averages over the 2 non-empty rows only
    lone, _ = algo.gspo_policy_loss(logp[[0, 2]], old[[0, 2]], adv[[0, 2]], mask[[0, 2]], 0.2, 0.2)
    torch.testing.assert_close(loss, lone)
    empty, _ = algo.gspo_policy_loss(logp, old, adv, torch.zeros(3, 4, dtype=torch.bool), 0.2, 0.2)
    assert empty.item() == 0.0


def test_gspo_equals_a_loop_over_sequences():
    torch.manual_seed(1)
    B, T = 5, 6
    logp, old, adv = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T,
                                                                          dtype=torch.float64), \
        torch.randn(B, 1, dtype=torch.float64).expand(B, T)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    loss, _ = algo.gspo_policy_loss(logp, old, adv, mask, 0.1, 0.15)
    total = 0.0
    for i in range(B):
        m = mask[i]
        s = math.exp(float((logp[i][m] - old[i][m]).mean()))
        a = float(adv[i, 0])
        total += max(-a * s, -a * min(max(s, 0.9), 1.15))
    torch.testing.assert_close(loss, torch.tensor(total / B, dtype=torch.float64))


# ---- cispo_policy_loss ----


def test_cispo_value_and_gradient_by_hand_with_clipped_weights():
    # ratios: e^{ln2} = 2 (clipped to 1.28), e^{-ln2} = 0.5 (inside [0, 1.28]), 1
    old = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64)
    logp = _leaf([[-1.0 + LN2, -1.0 - LN2, -2.0]])
    adv = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1]], dtype=torch.bool)
    loss, m = algo.cispo_policy_loss(logp, old, adv, mask, 1.0, 0.28)
    lp = logp.detach()[0]
    want = (-1.28 * 1.0 * lp[0] - 0.5 * -2.0 * lp[1] - 1.0 * 3.0 * lp[2]) / 3
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    # grad = -w A / 3: the clipped token still gets a gradient (the point of CISPO)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.28 / 3, 1.0 / 3, -1.0]],
                                                       dtype=torch.float64))
    torch.testing.assert_close(m[schema.CLIP_FRAC_HIGH], torch.tensor(1 / 3))
    assert m[schema.CLIP_FRAC_LOW] == 0


def test_cispo_lower_bound_far_outside_and_masked_rows():
    # ratio e^{-30}: clamped log-ratio -20, weight clipped up to 1 - 0.2 = 0.8; a length-1 row
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    logp = _leaf([[-30.0, 0.0], [0.0, 0.0]])
    adv = torch.tensor([[-1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)
    loss, m = algo.cispo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor(0.8 * -30.0, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.8, 0.0], [0.0, 0.0]],
                                                       dtype=torch.float64))
    assert m[schema.CLIP_FRAC_LOW] == 1 and m[schema.VALID_TOKENS] == 1


def test_cispo_per_token_bounds_from_d_and_seq_aggregation():
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.full((2, 2), 0.5, dtype=torch.float64)  # ratio e^0.5 = 1.6487 everywhere
    adv = torch.ones(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    hi = torch.tensor([[0.1, 0.7], [0.3, 0.3]], dtype=torch.float64)
    loss, _ = algo.cispo_policy_loss(logp, old, adv, mask, 0.2, hi, agg="seq-mean-token-mean")
    # row 0: mean(-1.1*0.5, -1.6487*0.5); row 1: -1.3*0.5; mean over the 2 rows
    r = math.exp(0.5)
    want = ((-1.1 * 0.5 - r * 0.5) / 2 + -1.3 * 0.5) / 2
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64))


# ---- aggregate and Dr. GRPO's advantages ----


def test_aggregate_modes_and_normalizer():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert algo.aggregate(x, mask, "token-mean").item() == pytest.approx(6 / 3)
    assert algo.aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3) / 2)
    assert algo.aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 3) / 2)
    # Dr. GRPO's constant: 3 rows x budget 4
    assert algo.aggregate(x, mask, "seq-mean-token-sum", 12.0).item() == pytest.approx(6 / 12)


def test_grpo_advantages_without_std_are_reward_minus_group_mean():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 7])  # group 7 has one response
    a = algo.grpo_advantages(scores, groups, scale_by_std=False)
    # group 0: mean 0.25; group 1 alone: mean 0 (as verl) -> 2; group 7 alone -> 1
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 2.0, 1.0]))
    scaled = algo.grpo_advantages(scores, groups)
    torch.testing.assert_close(scaled[:4], a[:4] / (0.5 + 1e-6))
