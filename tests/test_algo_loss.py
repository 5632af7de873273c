"""PPO loss with dual clip, components C and D, forking-token mask, TIS weights."""

import math

import pytest
import torch
from torch.testing import assert_close

from analysis import schema
from hapo_cli.algo import (
    adaptive_clip_bounds,
    forking_token_mask,
    policy_loss,
    redistribute_advantages,
    tis_weights,
)

METRIC_KEYS = {
    schema.PG_LOSS, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH, schema.DUAL_CLIP_FRAC,
    schema.RATIO_DEV_MEAN, schema.RATIO_MEAN, schema.ADV_C_POS_TOKEN_SUM,
    schema.ADV_C_NEG_TOKEN_SUM, schema.ADV_C_POS_TOKEN_COUNT, schema.ADV_C_NEG_TOKEN_COUNT,
    schema.VALID_TOKENS,
}
H_KEYS = {schema.CLIP_FRAC_LOW_HI_ENT, schema.CLIP_FRAC_LOW_LO_ENT, schema.CLIP_FRAC_HIGH_HI_ENT,
          schema.CLIP_FRAC_HIGH_LO_ENT}


def test_adaptive_clip_bounds_hand_values():
    h = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    low, high = adaptive_clip_bounds(h, 0.2, 0.28, alpha=1.0)
    # low side widens for h <= 0: 0.2 * (1 - h) = 0.4, 0.3, 0.2 ; unchanged for h > 0
    assert_close(low, torch.tensor([[0.4, 0.3, 0.2, 0.2, 0.2]]))
    # high side widens for h > 0: 0.28 * (1 + h) = 0.42, 0.56 ; unchanged for h <= 0
    assert_close(high, torch.tensor([[0.28, 0.28, 0.28, 0.42, 0.56]]))
    low0, high0 = adaptive_clip_bounds(h, 0.2, 0.28, alpha=0.0)
    assert (low0 == 0.2).all() and (high0 == 0.28).all()


def test_redistribute_advantages_hand_values():
    # eps 0.2 / 0.2 -> neutral zone (0.9, 1.1); beta = 1; A = 2 everywhere
    h = torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.0, 0.5]])
    ratio = torch.tensor([[1.0, 1.2, 1.0, 0.8, 1.0, 1.15]])
    adv = torch.full((1, 6), 2.0)
    eps_high = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2, 0.4]])  # last: zone right edge 1.2
    out = redistribute_advantages(adv, h, ratio, 0.2, eps_high, beta=1.0)
    # high-ent inside keeps 2 ; high-ent outside 2 * 1.5 = 3 ; low-ent inside 2 * 0.5 = 1 ;
    # low-ent outside keeps 2 ; h = 0 counts as low-ent inside: 2 * 1 = 2 ;
    # own bounds: 1.15 < 1.2 is inside for the last token -> keeps 2
    assert_close(out, torch.tensor([[2.0, 3.0, 1.0, 2.0, 2.0, 2.0]]))
    assert_close(redistribute_advantages(adv, h, ratio, 0.2, 0.2, beta=0.0), adv)


def test_redistribute_does_not_differentiate_through_ratio():
    ratio = torch.tensor([[1.3]], requires_grad=True)
    out = redistribute_advantages(torch.tensor([[1.0]]), torch.tensor([[0.5]]), ratio, 0.2, 0.2)
    assert not out.requires_grad


def _hand_batch():
    # row 0 tokens (A, ratio): (+1, 1.5) (+1, 0.5) (-1, 0.5) (-2, 4.0) (-1, 1.1) + 1 masked
    # row 1: (+1, 1.0) + 5 masked. Masked positions hold garbage (huge ratio / advantage).
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, -1.0, 100.0], [1.0, 50.0, -50.0, 0, 0, 0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 4.0, 1.1, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    old = torch.zeros(2, 6)
    logp = ratio.log()
    logp[0, 5] = 50.0  # masked garbage: exp(50) would be huge
    logp[1, 1] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return logp.requires_grad_(), old, adv, mask


def test_policy_loss_hand_values_token_mean():
    logp, old, adv, mask = _hand_batch()
    loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.28, clip_c=3.0)
    # per token, L = max(-A r, -A clip(r, 0.8, 1.28)), then min(L, -A c) for A < 0:
    # (+1, 1.5): max(-1.5, -1.28) = -1.28  (high-clipped, no gradient)
    # (+1, 0.5): max(-0.5, -0.8) = -0.5    (not clipped: pushes ratio up)
    # (-1, 0.5): max(0.5, 0.8) = 0.8       (low-clipped, no gradient)
    # (-2, 4.0): max(8, 2.56) = 8 -> min(8, 2 * 3 = 6) = 6 (dual clip)
    # (-1, 1.1): 1.1 ; row 1 (+1, 1.0): -1
    # token-mean: (-1.28 - 0.5 + 0.8 + 6 + 1.1 - 1) / 6 = 5.12 / 6
    assert_close(loss, torch.tensor(5.12 / 6))
    assert set(m) == METRIC_KEYS
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert_close(m[schema.CLIP_FRAC_HIGH], torch.tensor(1 / 6))
    assert_close(m[schema.CLIP_FRAC_LOW], torch.tensor(1 / 6))
    assert_close(m[schema.DUAL_CLIP_FRAC], torch.tensor(1 / 6))
    # ratio mean (1.5 + 0.5 + 0.5 + 4 + 1.1 + 1) / 6 = 8.6 / 6 ; |r - 1|: (.5+.5+.5+3+.1+0)/6
    assert_close(m[schema.RATIO_MEAN], torch.tensor(8.6 / 6))
    assert_close(m[schema.RATIO_DEV_MEAN], torch.tensor(4.6 / 6))
    assert m[schema.ADV_C_POS_TOKEN_SUM] == 3.0 and m[schema.ADV_C_NEG_TOKEN_SUM] == -4.0
    assert m[schema.ADV_C_POS_TOKEN_COUNT] == 3 and m[schema.ADV_C_NEG_TOKEN_COUNT] == 3
    assert m[schema.VALID_TOKENS] == 6
    loss.backward()
    # dL/dlogp = dL/dr * r / 6: token 2: -A r = -0.5 -> -0.5/6 ; token 5: 1.1/6 ; row 1: -1/6 ;
    # clipped / dual-clipped / masked tokens: 0 (and no NaN from the NaN under the mask)
    expected = torch.zeros(2, 6)
    expected[0, 1], expected[0, 4], expected[1, 0] = -0.5 / 6, 1.1 / 6, -1 / 6
    assert_close(logp.grad, expected)


def test_policy_loss_aggregations_and_normalizer():
    logp, old, adv, mask = _hand_batch()
    # row sums: 6.12 (5 tokens) and -1 (1 token)
    seq_mean = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, agg="seq-mean-token-mean")[0]
    assert_close(seq_mean, torch.tensor((6.12 / 5 - 1.0) / 2))
    seq_sum = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, agg="seq-mean-token-sum")[0]
    assert_close(seq_sum, torch.tensor((6.12 - 1.0) / 2))
    # global token count of 10 (e.g. other micro-batches hold 4 more tokens): 5.12 / 10
    glob = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, normalizer=10)[0]
    assert_close(glob, torch.tensor(0.512))
    glob_seq = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, agg="seq-mean-token-sum",
                           normalizer=torch.tensor(4.0))[0]
    assert_close(glob_seq, torch.tensor(5.12 / 4))


def test_policy_loss_entropy_split_and_c_metrics():
    logp, old, adv, mask = _hand_batch()
    h = torch.tensor([[0.5, -0.5, -0.5, 0.3, 0.1, 0.9], [0.0, 0, 0, 0, 0, 0]])
    before = adv.clone()
    before[0, 0], before[0, 2] = 0.5, -4.0  # |1| > |0.5| amplified ; |-1| < |-4| damped
    _, m = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, h=h, adv_before=before)
    assert set(m) == METRIC_KEYS | H_KEYS | {schema.C_AMPLIFIED_FRAC, schema.C_DAMPED_FRAC}
    # high-clipped token 0 has h = 0.5 > 0 ; low-clipped token 2 has h = -0.5 <= 0
    assert_close(m[schema.CLIP_FRAC_HIGH_HI_ENT], torch.tensor(1 / 6))
    assert_close(m[schema.CLIP_FRAC_HIGH_LO_ENT], torch.tensor(0.0))
    assert_close(m[schema.CLIP_FRAC_LOW_LO_ENT], torch.tensor(1 / 6))
    assert_close(m[schema.CLIP_FRAC_LOW_HI_ENT], torch.tensor(0.0))
    assert_close(m[schema.C_AMPLIFIED_FRAC], torch.tensor(1 / 6))
    assert_close(m[schema.C_DAMPED_FRAC], torch.tensor(1 / 6))


def test_policy_loss_tensor_eps_and_log_ratio_clamp():
    # per-token bounds: token 0 eps_high 0.6 -> ratio 1.5 is inside -> -1.5, not clipped
    logp = torch.log(torch.tensor([[1.5, 1.5]]))
    eps_high = torch.tensor([[0.6, 0.28]])
    loss, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                          torch.full((1, 2), 0.2), eps_high)
    assert_close(loss, torch.tensor((-1.5 - 1.28) / 2))
    assert_close(m[schema.CLIP_FRAC_HIGH], torch.tensor(0.5))
    # log ratio 1000 is clamped to 20 before exp: finite loss = -c * A ... dual-clipped for A < 0
    big = torch.tensor([[1000.0]])
    loss, m = policy_loss(big, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.2, 0.2)
    assert torch.isfinite(loss) and loss == 10.0  # min(e^20, c = 10) * |A|
    assert_close(m[schema.RATIO_MEAN], torch.tensor(math.exp(20.0)))


def test_policy_loss_all_masked_is_zero_not_nan():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.2, 0.2)
    loss.backward()
    assert loss == 0 and (logp.grad == 0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_policy_loss_validation():
    z = torch.zeros(2, 3)
    msk = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        policy_loss(z, z, z[:, :2], msk, 0.2, 0.2)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(z, z, z, msk, 0.2, 0.2, agg="sum")
    with pytest.raises(ValueError, match="clip_c"):
        policy_loss(z, z, z, msk, 0.2, 0.2, clip_c=1.0)


def test_forking_token_mask_hand_values():
    entropy = torch.arange(1.0, 11.0).reshape(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    # 0.8-quantile of 1..10: position 0.8 * 9 = 7.2 -> 8 + 0.2 * (9 - 8) = 8.2 -> {9, 10}
    out = forking_token_mask(entropy, mask, 0.2)
    assert out.sum() == 2 and out[1, 3] and out[1, 4]
    # a masked token with huge entropy neither counts nor is selected
    entropy2 = entropy.clone()
    entropy2[0, 0] = 1e6
    mask2 = mask.clone()
    mask2[0, 0] = False
    # valid 2..10 (9 values): position 0.8 * 8 = 6.4 -> 8 + 0.4 = 8.4 -> {9, 10}
    out2 = forking_token_mask(entropy2, mask2, 0.2)
    assert out2.sum() == 2 and not out2[0, 0]
    assert not forking_token_mask(entropy, torch.zeros_like(mask)).any()


def test_tis_weights_hand_values():
    old = torch.log(torch.tensor([2.0, 0.5, 1.0]))
    behav = torch.zeros(3)
    # ratios 2, 0.5, 1 -> capped at 1.5
    assert_close(tis_weights(old, behav, cap=1.5), torch.tensor([1.5, 0.5, 1.0]))
