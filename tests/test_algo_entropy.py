"""Entropy, entropy stats, normalised entropy and adaptive temperature (component A)."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from hapo_cli.algo import (
    EntropyStats,
    adaptive_temperature,
    apply_adaptive_temperature,
    entropy_stats,
    normalized_entropy,
    token_entropy,
)
from hapo_cli.algo.entropy import quantile_1d

NEG_INF = float("-inf")

# The 2x3 example used below: entropies H = exp(x) with log-entropies
#   x = [[-3, 0, -2], [1, -1, -3]]   -> sorted: -3, -3, -2, -1, 0, 1   (n = 6)
# pivot 0.8: position 0.8 * (6 - 1) = 4 -> rho = x_(4) = 0 in both modes (integer position).
# deviations d = x - 0 = sorted -3, -3, -2, -1, 0, 1 ; sum d^2 = 9 + 9 + 4 + 1 + 0 + 1 = 24
# sigma = sqrt(24 / 6) = 2 ; z = x / 2 = [[-1.5, 0, -1], [0.5, -0.5, -1.5]]
# scale_pos = max z = 0.5 ; paper scale_neg = |min z| = 1.5 ; released scale_neg = min z = -1.5
X = torch.tensor([[-3.0, 0.0, -2.0], [1.0, -1.0, -3.0]], dtype=torch.float64)
H = X.exp()
MASK = torch.ones(2, 3, dtype=torch.bool)


def test_token_entropy_uniform_one_hot_and_neg_inf():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # uniform over 4: H = log 4
                           [0.0, 0.0, NEG_INF, NEG_INF],  # uniform over 2: H = log 2
                           [5.0, NEG_INF, NEG_INF, NEG_INF]])  # one-hot: H = 0
    assert_close(token_entropy(logits), torch.tensor([math.log(4), math.log(2), 0.0]))


def test_token_entropy_bf16_input_accumulates_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1000) * 3
    out = token_entropy(logits.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    # same bf16 values upcast -> identical math in fp32
    assert_close(out, token_entropy(logits.bfloat16().float()))


def test_entropy_stats_hand_example_paper():
    s = entropy_stats(H, MASK, pivot=0.8, mode="paper")
    assert (s.rho, s.mode, s.num_tokens) == (pytest.approx(0.0, abs=1e-12), "paper", 6)
    assert s.std == pytest.approx(2.0)
    assert s.scale_pos == pytest.approx(0.5)
    assert s.scale_neg == pytest.approx(1.5)
    # h = z / 0.5 where z > 0, z / 1.5 where z <= 0:
    # z = [[-1.5, 0, -1], [0.5, -0.5, -1.5]] -> h = [[-1, 0, -2/3], [1, -1/3, -1]]
    expected = torch.tensor([[-1.0, 0.0, -2 / 3], [1.0, -1 / 3, -1.0]], dtype=torch.float64)
    assert_close(normalized_entropy(H, s), expected)


def test_entropy_stats_hand_example_released_sign_convention():
    s = entropy_stats(H, MASK, pivot=0.8, mode="released")
    assert s.std == pytest.approx(2.0)
    assert s.scale_pos == pytest.approx(0.5)
    assert s.scale_neg == pytest.approx(-1.5)  # the released code's sign
    # z <= 0 divided by -1.5 flips sign: low-entropy tokens get h >= 0 (treated as high-entropy)
    # h = [[1, 0, 2/3], [1, 1/3, 1]]
    expected = torch.tensor([[1.0, 0.0, 2 / 3], [1.0, 1 / 3, 1.0]], dtype=torch.float64)
    assert_close(normalized_entropy(H, s).abs(), expected)  # -0.0 at z = 0
    assert (normalized_entropy(H, s) >= 0).all()


def test_entropy_stats_ignores_masked_tokens():
    # add a masked-out third row with absurd entropies; stats must not move
    h3 = torch.cat([H, torch.tensor([[1e9, 0.0, 123.0]], dtype=torch.float64)])
    m3 = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    for mode in ("paper", "released"):
        assert entropy_stats(h3, m3, 0.8, mode) == entropy_stats(H, MASK, 0.8, mode)


def test_quantile_rule_linear_vs_nearest_rank():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    # pivot 0.5: position 0.5 * 3 = 1.5 -> linear: 1 + 0.5 * (2 - 1) = 1.5
    assert quantile_1d(x, 0.5, "paper") == pytest.approx(1.5)
    assert quantile_1d(x, 0.5, "paper") == pytest.approx(float(torch.quantile(x, 0.5)))
    # nearest rank: round(1.5) = 2 (Python rounds half to even) -> x[2] = 2
    assert quantile_1d(x, 0.5, "released") == 2.0
    # position 0.8 * 3 = 2.4 -> linear 2.4 ; round(2.4) = 2 -> 2
    assert quantile_1d(x, 0.8, "paper") == pytest.approx(2.4)
    assert quantile_1d(x, 0.8, "released") == 2.0


def test_pivot_quantile_modes_give_different_rho():
    h = torch.tensor([[1.0, math.e, math.e**2, math.e**3]])  # x = 0, 1, 2, 3
    m = torch.ones(1, 4, dtype=torch.bool)
    assert entropy_stats(h, m, 0.5, "paper").rho == pytest.approx(1.5, abs=1e-6)
    assert entropy_stats(h, m, 0.5, "released").rho == pytest.approx(2.0, abs=1e-6)


def test_degenerate_no_valid_tokens():
    m = torch.zeros(2, 3, dtype=torch.bool)
    s = entropy_stats(H, m, 0.8, "paper")
    assert (s.rho, s.std, s.scale_pos, s.scale_neg, s.num_tokens) == (0.0, 1.0, 1.0, 1.0, 0)
    r = entropy_stats(H, m, 0.8, "released")  # what the released code yields: sqrt(eps), +-eps
    assert (r.rho, r.std, r.scale_pos, r.scale_neg) == (0.0, pytest.approx(1e-4), 1e-8, -1e-8)
    for st in (s, r):
        assert torch.isfinite(normalized_entropy(H, st)).all()


def test_degenerate_all_equal_entropy_gives_h_zero():
    h = torch.full((2, 3), 0.7)
    for mode in ("paper", "released"):
        s = entropy_stats(h, MASK, 0.8, mode)
        assert s.rho == pytest.approx(math.log(0.7))
        hn = normalized_entropy(h, s)
        assert torch.isfinite(hn).all() and (hn == 0).all()


def test_degenerate_no_positive_z():
    # pivot 1.0 -> rho = max x, so no z > 0: paper keeps scale_pos = 1, released eps
    s = entropy_stats(H, MASK, 1.0, "paper")
    assert s.rho == pytest.approx(1.0) and s.scale_pos == 1.0
    r = entropy_stats(H, MASK, 1.0, "released")
    assert r.scale_pos == 1e-8
    assert torch.isfinite(normalized_entropy(H * 10, s)).all()
    assert torch.isfinite(normalized_entropy(H * 10, r)).all()


def test_zero_entropy_is_clamped_by_eps():
    h = torch.tensor([[0.0, 1.0, 2.0]])
    s = entropy_stats(h, torch.ones(1, 3, dtype=torch.bool), 0.8, "paper")
    assert math.isfinite(s.rho) and math.isfinite(s.std)
    # log(max(0, 1e-8)) = -18.42 is the minimum -> h = -1 there
    assert_close(normalized_entropy(h, s)[0, 0], torch.tensor(-1.0))


def test_normalized_entropy_clamps_out_of_batch_values():
    s = EntropyStats(rho=0.0, std=1.0, scale_pos=0.5, scale_neg=1.5)
    # x = log H = 3 -> z = 3 -> 3 / 0.5 = 6 -> clamp 1 ; x = -6 -> -6 / 1.5 = -4 -> clamp -1
    out = normalized_entropy(torch.tensor([math.exp(3.0), math.exp(-6.0), math.exp(0.25)]), s)
    assert_close(out, torch.tensor([1.0, -1.0, 0.5]))


def test_stats_json_round_trip_and_validation():
    s = entropy_stats(H, MASK, 0.8, "released")
    d = json.loads(json.dumps(s.to_dict()))
    assert EntropyStats.from_dict(d) == s
    assert EntropyStats.from_dict({"rho": 1, "std": 2, "scale_pos": 3, "scale_neg": 4}).mode == "paper"
    with pytest.raises(ValueError, match="unknown keys"):
        EntropyStats.from_dict({**d, "median": 1.0})
    with pytest.raises(ValueError, match="missing keys"):
        EntropyStats.from_dict({"rho": 1.0})
    with pytest.raises(ValueError, match="mode"):
        EntropyStats(0.0, 1.0, 1.0, 1.0, mode="verl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        EntropyStats(0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        EntropyStats(float("nan"), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        entropy_stats(H, MASK[:, :2])
    with pytest.raises(ValueError, match="pivot"):
        entropy_stats(H, MASK, pivot=1.5)
    with pytest.raises(ValueError, match="mode"):
        entropy_stats(H, MASK, mode="median")  # type: ignore[arg-type]


# Adaptive temperature. Stats chosen by hand: rho = log(log 4), std = log 2, scale_pos = 2,
# scale_neg = 4 (paper). Rows: uniform over 4 -> H = log 4 -> z = 0 -> h = 0 -> T;
# uniform over 16 -> H = 2 log 4 -> x - rho = log 2 -> z = 1 -> h = 1/2 -> T (1 + tau/2);
# uniform over 2 (two finite logits, rest -inf) -> H = log 4 / 2 -> z = -1 -> h = -1/4.
STATS_A = EntropyStats(rho=math.log(math.log(4)), std=math.log(2), scale_pos=2.0, scale_neg=4.0)


def _rows() -> torch.Tensor:
    logits = torch.full((3, 16), NEG_INF)
    logits[0, :4] = 1.0
    logits[1, :] = -2.0
    logits[2, :2] = 3.0
    return logits


def test_adaptive_temperature_hand_values():
    t = adaptive_temperature(_rows(), 0.8, 0.1, STATS_A)
    # 0.8 * [1, 1 + 0.1 * 0.5, 1 - 0.1 * 0.25] = [0.8, 0.84, 0.78]
    assert_close(t, torch.tensor([0.8, 0.84, 0.78]))


def test_adaptive_temperature_released_sign_and_decode_eps():
    released = EntropyStats(STATS_A.rho, STATS_A.std, 2.0, -4.0, mode="released")
    t = adaptive_temperature(_rows(), 0.8, 0.1, released)
    # low-entropy row: z = -1 / -4 = +1/4 -> hotter: 0.8 * 1.025 = 0.82 (the released bug).
    # atol 1e-5: released decode divides by std + 1e-6, shifting h by ~1e-6 relative.
    assert_close(t, torch.tensor([0.8, 0.84, 0.82]), atol=1e-5, rtol=0)


def test_adaptive_temperature_clamps_h_and_handles_none_and_tensor_base():
    far = EntropyStats(rho=-10.0, std=1.0, scale_pos=1.0, scale_neg=1.0)  # every z >> 1
    assert_close(adaptive_temperature(_rows(), 1.0, 0.05, far), torch.full((3,), 1.05))
    base = torch.tensor([0.5, 1.0, 2.0])
    assert_close(adaptive_temperature(_rows(), base, 0.05, None), base)
    assert_close(adaptive_temperature(_rows(), 0.7, 0.0, STATS_A), torch.full((3,), 0.7))
    assert_close(adaptive_temperature(_rows(), base, 0.1, STATS_A), base * torch.tensor([1.0, 1.05, 0.975]))
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        adaptive_temperature(torch.zeros(2, 3, 4), 1.0, 0.05, STATS_A)
    with pytest.raises(ValueError, match="base_temperature"):
        adaptive_temperature(_rows(), torch.ones(2), 0.05, STATS_A)


def test_apply_adaptive_temperature_divides_rows():
    logits = _rows()
    scaled, temps = apply_adaptive_temperature(logits, 0.8, 0.1, STATS_A)
    assert_close(temps, torch.tensor([0.8, 0.84, 0.78]))
    assert_close(scaled, logits / temps[:, None])
    assert scaled.dtype == logits.dtype
    bf, tb = apply_adaptive_temperature(logits.bfloat16(), 0.8, 0.1, STATS_A)
    assert bf.dtype == torch.bfloat16 and torch.isneginf(bf[0, 4:]).all()
    # bf16 logits: entropies of these rows are exact in bf16 (equal finite logits)
    assert_close(tb, temps)


@pytest.mark.parametrize("q", [0.0, 0.13, 0.5, 0.8, 1.0])
def test_quantile_1d_matches_torch_quantile_on_unsorted_input(q):
    x = torch.randn(101, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert quantile_1d(x, q, "paper") == pytest.approx(float(torch.quantile(x, q)))
    assert quantile_1d(x, q, "released") == float(x.sort().values[round(q * 100)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_extreme_tokens_get_exact_h_and_sign_counts_survive_padding_noise(seed):
    """Regression (CI failed on one machine only): two equal runs padded to different widths
    give entropies that differ by float noise (up to 8e-7 measured). With z in float32 the
    batch's lowest-entropy token got h = -0.99999988 in one run and -1.0 in the other, so C's
    `A (1 + beta h)` was 8e-8 vs 0 and `adv_pos_token_count` differed by one. Now h is exactly
    -1 / +1 at the extremes in both runs, A' is exactly 0 there, and counts agree."""
    from hapo_cli.algo import advantage_signs, redistribute_advantages

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(16, 24, generator=g) > 0.2
    # distinct entropies (gaps 5e-3 >> noise), skewed low: the noise must not change which
    # token is the lowest, only its last bits
    entropy = ((torch.randperm(16 * 24, generator=g) + 1.0) * 5e-3).pow(2).reshape(16, 24) / 2
    noise = (torch.rand(16, 24, generator=g) - 0.5) * 1.6e-6  # |noise| <= 8e-7
    adv = torch.where(torch.rand(16, 24, generator=g) > 0.5, 1.0, -1.0)
    counts = []
    for ent in (entropy, (entropy + noise).clamp_min(1e-6)):
        stats = entropy_stats(ent, mask)
        h = normalized_entropy(ent, stats)
        assert h.dtype == torch.float32
        low = ent.masked_fill(~mask, float("inf")).argmin()
        high = ent.masked_fill(~mask, -float("inf")).argmax()
        assert h.flatten()[low].item() == -1.0 and h.flatten()[high].item() == 1.0
        adv_c = redistribute_advantages(adv, h, torch.ones_like(h), 0.2, 0.2, beta=1.0)
        assert adv_c.flatten()[low].item() == 0.0
        pos, neg = advantage_signs(adv_c, mask)
        counts.append((int(pos.sum()), int(neg.sum())))
    assert counts[0] == counts[1]


def test_advantage_signs_ignore_noise_below_tolerance():
    from hapo_cli.algo import ADV_SIGN_TOL, advantage_signs

    adv = torch.tensor([[1.0, -1.0, 8.3e-8, -8.3e-8, 0.0, 2 * ADV_SIGN_TOL]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    pos, neg = advantage_signs(adv, mask)
    assert pos.tolist() == [[True, False, False, False, False, False]]
    assert neg.tolist() == [[False, True, False, False, False, False]]
