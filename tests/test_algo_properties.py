"""Property tests (hypothesis) of the algo invariants. Each test draws sizes and a seed and
builds its tensors with a seeded torch generator, so failures shrink to small, replayable cases."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hapo_cli.algo import (
    adaptive_clip_bounds,
    entropy_stats,
    forking_token_mask,
    grpo_advantages,
    normalized_entropy,
    policy_loss,
    redistribute_advantages,
    stats_from_shards,
    token_level_group_advantages,
)
from hapo_cli.algo.entropy import valid_log_entropy

SETTINGS = settings(max_examples=50, deadline=None)
modes = st.sampled_from(["paper", "released"])


def _batch(seed: int, prompts: int, g: int, t: int):
    gen = torch.Generator().manual_seed(seed)
    b = prompts * g
    ids = torch.arange(b) // g
    scores = torch.randint(0, 2, (b,), generator=gen).float() + torch.rand(b, generator=gen) * 0.1
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    entropy = torch.rand(b, t, generator=gen) ** 4 * 5
    logp = -torch.rand(b, t, generator=gen) * 3
    old_logp = logp + torch.randn(b, t, generator=gen) * 0.3
    adv = torch.randn(b, t, generator=gen)
    return gen, ids, scores, mask, entropy, logp, old_logp, adv


sizes = dict(seed=st.integers(0, 2**31 - 1), prompts=st.integers(1, 5), g=st.integers(1, 6),
             t=st.integers(1, 12))


@SETTINGS
@given(**sizes)
def test_token_advantages_sum_to_zero_per_group(seed, prompts, g, t):
    _, ids, scores, mask, *_ = _batch(seed, prompts, g, t)
    adv = token_level_group_advantages(scores, mask, ids, fallback_threshold=float("inf"))
    per_group = torch.zeros(prompts).index_add_(0, ids, (adv * mask).sum(dim=1))
    assert_close(per_group, torch.zeros(prompts), atol=1e-4, rtol=0)  # float32 sums of O(10) values


@SETTINGS
@given(**sizes, mode=modes, pivot=st.floats(0.0, 1.0))
def test_h_in_unit_interval(seed, prompts, g, t, mode, pivot):
    _, _, _, mask, entropy, *_ = _batch(seed, prompts, g, t)
    stats = entropy_stats(entropy, mask, pivot, mode)
    h = normalized_entropy(entropy * 3, stats)  # also entropies outside the batch's range
    assert torch.isfinite(h).all() and (h.abs() <= 1).all()
    if mode == "released":  # the released sign convention: h >= 0 on the batch's own tokens
        assert (normalized_entropy(entropy, stats)[mask] >= 0).all()


@SETTINGS
@given(**sizes, eps_low=st.floats(0.05, 0.3), eps_high=st.floats(0.05, 0.4))
def test_components_off_equal_direct_dapo_formula(seed, prompts, g, t, eps_low, eps_high):
    _, _, _, mask, entropy, logp, old_logp, adv = _batch(seed, prompts, g, t)
    h = normalized_entropy(entropy, entropy_stats(entropy, mask))
    ratio = torch.exp(logp - old_logp)
    # C and D with alpha = beta = 0 are the identity
    lo, hi = adaptive_clip_bounds(h, eps_low, eps_high, alpha=0.0)
    adv_c = redistribute_advantages(adv, h, ratio, lo, hi, beta=0.0)
    assert_close(adv_c, adv)
    assert_close(lo, torch.full_like(h, eps_low))
    assert_close(hi, torch.full_like(h, eps_high))
    loss, _ = policy_loss(logp, old_logp, adv_c, mask, lo, hi, clip_c=1e9, h=h)
    # DAPO token-mean: sum over valid tokens of max(-A r, -A clip(r, 1-el, 1+eh)) / #valid
    direct = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    expected = (direct * mask).sum() / mask.sum().clamp_min(1)
    assert_close(loss, expected)


@SETTINGS
@given(**sizes, mode=modes)
def test_masked_values_never_change_outputs(seed, prompts, g, t, mode):
    gen, ids, scores, mask, entropy, logp, old_logp, adv = _batch(seed, prompts, g, t)
    off = ~mask

    def scramble(x, scale):
        y = x.clone()
        y[off] = torch.randn(int(off.sum()), generator=gen) * scale
        return y

    e2 = scramble(entropy, 100.0).abs()
    assert entropy_stats(entropy, mask, 0.8, mode) == entropy_stats(e2, mask, 0.8, mode)
    assert torch.equal(forking_token_mask(entropy, mask), forking_token_mask(e2, mask))
    h = normalized_entropy(entropy, entropy_stats(entropy, mask))
    outs = []
    for lp, olp, a, hh in ((logp, old_logp, adv, h), (scramble(logp, 1e4), scramble(old_logp, 1e4),
                                                     scramble(adv, 1e6), scramble(h, 5.0))):
        lp = lp.clone().requires_grad_()
        lo, hi = adaptive_clip_bounds(hh, 0.2, 0.28)
        loss, metrics = policy_loss(lp, olp, a, mask, lo, hi, h=hh)
        loss.backward()
        outs.append((loss.detach(), metrics, lp.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
    assert torch.equal(outs[0][2], outs[1][2])


@SETTINGS
@given(**sizes)
def test_permuting_responses_permutes_advantages(seed, prompts, g, t):
    gen, ids, scores, mask, *_ = _batch(seed, prompts, g, t)
    perm = torch.randperm(len(ids), generator=gen)
    relabel = torch.randperm(prompts, generator=gen) * 7 + 3  # group ids need not be 0..n-1
    a = token_level_group_advantages(scores, mask, ids, fallback_threshold=3.0)
    b = token_level_group_advantages(scores[perm], mask[perm], relabel[ids][perm], fallback_threshold=3.0)
    assert_close(b, a[perm])
    assert_close(grpo_advantages(scores[perm], relabel[ids][perm]), grpo_advantages(scores, ids)[perm])


@SETTINGS
@given(**sizes, mode=modes, cuts=st.lists(st.integers(0, 30), max_size=4))
def test_entropy_stats_independent_of_micro_batch_split(seed, prompts, g, t, mode, cuts):
    _, _, _, mask, entropy, *_ = _batch(seed, prompts, g, t)
    b = mask.shape[0]
    bounds = sorted({0, b, *[c % (b + 1) for c in cuts]})
    xs = [valid_log_entropy(entropy[lo:hi], mask[lo:hi]) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    split, _ = stats_from_shards(xs, 0.8, mode)
    whole = entropy_stats(entropy, mask, 0.8, mode)
    got = torch.tensor([split.rho, split.std, split.scale_pos, split.scale_neg], dtype=torch.float64)
    exp = torch.tensor([whole.rho, whole.std, whole.scale_pos, whole.scale_neg], dtype=torch.float64)
    assert_close(got, exp)
