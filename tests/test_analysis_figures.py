"""analysis.figures: each figure function on small hand-made tables (Agg canvas).

The checks read the plotted data back (line xdata/ydata, bar sizes, histogram heights,
scatter offsets) and the titles and labels, not only that a figure exists.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis import schema  # noqa: E402
from analysis.figures import MissingData, color_map  # noqa: E402
from analysis.tables import dual_entropy_table  # noqa: E402


def lines_by_label(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines()}


def xy(line) -> tuple[list, list]:
    return list(np.asarray(line.get_xdata(), float)), list(np.asarray(line.get_ydata(), float))


def bands(ax) -> list:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


@pytest.fixture
def metrics() -> pd.DataFrame:
    """Label X with seeds 1 and 2, label Y with one seed; steps 1-3."""
    rows = []
    for run, label, seed, off in [("x1", "X", 1, 0.0), ("x2", "X", 2, 0.2), ("y1", "Y", 1, 1.0)]:
        for t in (1, 2, 3):
            row = {"run": run, "label": label, "seed": seed, "step": t,
                   schema.ENTROPY_MEAN: 1.0 + off - 0.1 * t,
                   schema.ENTROPY_P20: 0.5 + off, schema.ENTROPY_P80: 1.5 + off,
                   schema.RESPONSE_LEN_MEAN: 100.0 + t + off,
                   schema.RESPONSE_LEN_CORRECT_MEAN: 90.0 + t,
                   schema.RESPONSE_LEN_INCORRECT_MEAN: 120.0 + t,
                   schema.REWARD_MEAN: 0.1 * t, schema.REWARD_ACC: 0.1 * t + off,
                   schema.CLIP_FRAC_LOW_HI_ENT: 0.02, schema.CLIP_FRAC_LOW_LO_ENT: 0.01,
                   schema.CLIP_FRAC_HIGH: 0.04,
                   schema.ADV_POS_TOKEN_SUM: 5.0, schema.ADV_NEG_TOKEN_SUM: -5.0,
                   schema.ADV_SEQ_POS_TOKEN_SUM: 7.0, schema.ADV_SEQ_NEG_TOKEN_SUM: -4.0}
            if t != 2:  # validation every other step: NaN at step 2
                row["val/toy/avg@4"] = 0.2 * t + off
                row["val/toy/greedy"] = 0.3 * t
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- curves


def test_validation_accuracy_seed_mean_band_and_labels(metrics):
    fig = F.validation_accuracy(metrics)
    (ax,) = fig.axes
    assert ax.get_title() == "toy" and ax.get_xlabel() == "step"
    assert ax.get_ylabel() == "accuracy"
    lines = lines_by_label(ax)
    assert set(lines) == {"X avg@4", "Y avg@4", "X greedy", "Y greedy"}
    # X avg@4: seed 1 -> 0.2, 0.6 at steps 1, 3; seed 2 adds 0.2 -> 0.4, 0.8; mean 0.3, 0.7
    x, y = xy(lines["X avg@4"])
    assert x == [1.0, 3.0] and y == pytest.approx([0.3, 0.7])
    assert lines["X greedy"].get_linestyle() == "--"
    assert xy(lines["Y avg@4"])[1] == pytest.approx([1.2, 1.6])  # 0.2t + 1
    # band only for X (two seeds): mean +- sample std = 0.3 +- 0.1414
    (band,) = bands(ax)[:1]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.3 - 0.02**0.5) and ys.max() == pytest.approx(0.7 + 0.02**0.5)
    assert len(bands(ax)) == 2  # X avg@4 and X greedy; none for Y
    assert fig.get_suptitle() == "Validation accuracy"


def test_token_entropy_line_and_percentile_band(metrics):
    fig = F.token_entropy(metrics)
    (ax,) = fig.axes
    lines = lines_by_label(ax)
    # X mean over seeds: (1.0 - 0.1t + 1.2 - 0.1t) / 2 = 1.1 - 0.1t
    assert xy(lines["X"]) == ([1.0, 2.0, 3.0], pytest.approx([1.0, 0.9, 0.8]))
    assert xy(lines["Y"])[1] == pytest.approx([1.9, 1.8, 1.7])
    # X band edges: p20 mean (0.5 + 0.7)/2 = 0.6, p80 mean (1.5 + 1.7)/2 = 1.6
    band = next(c for c in bands(ax) if c.get_label() == "X p20-p80")
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.6) and ys.max() == pytest.approx(1.6)
    assert ax.get_ylabel() == "entropy (nats)"


def test_response_length_correct_and_incorrect(metrics):
    fig = F.response_length(metrics)
    ax_all, ax_split = fig.axes
    assert ax_all.get_title() == "all responses"
    lines = lines_by_label(ax_split)
    assert xy(lines["X correct"])[1] == pytest.approx([91.0, 92.0, 93.0])
    assert xy(lines["X incorrect"])[1] == pytest.approx([121.0, 122.0, 123.0])
    assert lines["X incorrect"].get_linestyle() == "--"
    # all responses, X: (100 + t + 100 + t + 0.2) / 2 = 100.1 + t
    assert xy(lines_by_label(ax_all)["X"])[1] == pytest.approx([101.1, 102.1, 103.1])


def test_reward_panels_only_for_logged_metrics(metrics):
    fig = F.reward_and_fill_rate(metrics)  # no fill rate / mixed groups logged
    assert [a.get_title() for a in fig.axes] == ["mean reward", "training accuracy"]
    m = metrics.assign(**{schema.FILL_RATE: 0.75})
    fig = F.reward_and_fill_rate(m)
    assert len(fig.axes) == 3
    assert xy(lines_by_label(fig.axes[2])["Y fill rate"])[1] == [0.75, 0.75, 0.75]


def test_advantage_balance_and_net_mass(metrics):
    fig = F.advantage_balance(metrics)
    seq, tok, net = fig.axes
    assert seq.get_title() == "sequence-level (GRPO)" and tok.get_title() == "token-level (B)"
    assert xy(lines_by_label(seq)["X negative"])[1] == [-4.0, -4.0, -4.0]
    nets = lines_by_label(net)
    assert xy(nets["X sequence-level (GRPO)"])[1] == [3.0, 3.0, 3.0]  # 7 - 4
    assert xy(nets["X token-level (B)"])[1] == [0.0, 0.0, 0.0]  # 5 - 5


# ---------------------------------------------------------------- tokens


@pytest.fixture
def tokens() -> pd.DataFrame:
    """One run, 10 tokens with hand-chosen entropy, clip side and text."""
    return pd.DataFrame({
        "run": "x1", "label": "X", "seed": 1, "step": 1, "sample": 0,
        "position": range(10),
        "token_text": [" the", " the", "$", "=", "=", "=", "wait", "2", " the", "x"],
        "entropy":    [0.1,    0.2,    0.3, 0.9, 1.0, 1.1, 2.0,    0.05, 2.5,   0.5],
        "h":          [-0.8,  -0.6,  -0.4, 0.2, 0.3, 0.4, 0.9,   -1.0, 1.0,   -0.1],
        "temperature": [0.96, 0.97, 0.98, 1.01, 1.015, 1.02, 1.045, 0.95, 1.05, 0.995],
        "ratio":      [0.7, 0.75, 1.0, 1.3, 1.25, 1.0, 1.4, 1.0, 0.6, 1.0],
        "adv":        [-1.0, -1.0, 0.5, 1.0, 1.0, -0.5, 1.0, 0.5, -1.0, 0.5],
        "clip_side": ["low", "low", "none", "high", "high", "none", "high", "none", "low",
                      "none"],
    })


def test_clipping_patterns_curves_and_entropy_histograms(metrics, tokens):
    fig = F.clipping_patterns(metrics, tokens)
    low, high, hist_low, hist_high = fig.axes
    assert low.get_title() == "low-side clip at 1 - eps_low (A < 0)"
    lo = lines_by_label(low)
    assert xy(lo["X high entropy"])[1] == [0.02] * 3 and xy(lo["X low entropy"])[1] == [0.01] * 3
    # the high side has no entropy split logged: the unsplit fraction, dotted
    hi = lines_by_label(high)
    assert set(hi) == {"X all tokens", "Y all tokens"}
    assert hi["X all tokens"].get_linestyle() == ":"
    # histograms: clipped entropies low {0.1, 0.2, 2.5}, high {0.9, 1.0, 2.0};
    # 40 bins over [0.1, 2.5] (width 0.06); density = count / (3 * 0.06)
    (patch_low,) = hist_low.patches
    data = patch_low.get_data()
    dens, edges = data.values, data.edges
    assert edges[0] == pytest.approx(0.1) and edges[-1] == pytest.approx(2.5)
    assert dens.sum() * 0.06 == pytest.approx(1.0)
    assert dens[0] == pytest.approx(1 / 0.18) and dens[-1] == pytest.approx(1 / 0.18)
    assert hist_high.get_title() == "entropy of high-side clipped tokens"
    assert hist_high.patches[0].get_label() == "X (n=3)"


def test_clipping_patterns_without_tokens_keeps_the_curves(metrics):
    fig = F.clipping_patterns(metrics, pd.DataFrame())
    assert len(fig.axes) == 2


def test_top_clipped_tokens_counts_and_visible_text(tokens):
    fig = F.top_clipped_tokens(tokens, top=20)
    low, high = fig.axes
    assert low.get_title() == "X: low-side" and high.get_title() == "X: high-side"
    # low side: " the" x3; high side: "=" x2, "wait" x1
    assert [t.get_text() for t in low.get_yticklabels()] == ["·the"]
    assert [p.get_width() for p in low.patches] == [3]
    assert [t.get_text() for t in high.get_yticklabels()] == ["=", "wait"]
    assert [p.get_width() for p in high.patches] == [2, 1]


def test_ratio_vs_advantage_splits_on_h(tokens):
    fig = F.ratio_vs_advantage(tokens)
    hi_ax, lo_ax = fig.axes
    assert hi_ax.get_title() == "high-entropy tokens (h > 0)"
    assert hi_ax.get_xlabel() == "advantage (before C)"
    # h > 0 rows: indices 3, 4, 5, 6, 8
    off = hi_ax.collections[0].get_offsets()
    assert sorted(map(tuple, np.asarray(off))) == sorted(
        [(1.0, 1.3), (1.0, 1.25), (-0.5, 1.0), (1.0, 1.4), (-1.0, 0.6)])
    assert len(lo_ax.collections[0].get_offsets()) == 5


def test_adaptive_temperature_histogram_and_scatter(metrics, tokens):
    m = metrics.assign(**{schema.TEMPERATURE_MEAN: 1.0})
    fig = F.adaptive_temperature(tokens, m)
    hist, scatter, curve = fig.axes
    data = hist.patches[0].get_data()
    dens, edges = data.values, data.edges
    assert edges[0] == pytest.approx(0.95) and edges[-1] == pytest.approx(1.05)
    assert dens.sum() * (0.1 / 40) == pytest.approx(1.0)
    off = np.asarray(scatter.collections[0].get_offsets())
    assert off[:, 0].tolist() == tokens["entropy"].tolist()
    assert off[:, 1].tolist() == tokens["temperature"].tolist()
    assert curve.get_title() == "mean sampling temperature"


def test_adaptive_temperature_constant_is_skipped(tokens):
    with pytest.raises(MissingData, match="constant .T=1.*component A is off"):
        F.adaptive_temperature(tokens.assign(temperature=1.0))


def test_dual_entropy_table_and_figure(tokens):
    table = dual_entropy_table(tokens, frac=0.2)
    # entropies sorted: .05 .1 .2 .3 .5 .9 1.0 1.1 2.0 2.5; q20 = 0.18, q80 = 1.28
    # (linear interpolation). low: "2"(.05), " the"(.1); high: "wait"(2.0), " the"(2.5)
    assert table.to_dict("records") == [
        {"token": " the", "high_count": 1, "low_count": 1, "total": 2}]
    fig = F.dual_entropy_tokens(table)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["·the"]
    assert [p.get_width() for p in ax.patches] == [1, 1]
    assert lines_by_label(ax) == {}
    assert ax.get_legend_handles_labels()[1] == ["high entropy (top 20%)",
                                                 "low entropy (bottom 20%)"]


# ---------------------------------------------------------------- evaluation


def test_temperature_sweep_fixed_vs_adaptive_latest_checkpoint():
    rows = []
    for t, acc in [(0.7, 0.5), (0.3, 0.2), (1.0, 0.3)]:
        rows.append({"run": "x1", "label": "X", "seed": 1, "benchmark": "toy",
                     "setting": f"T={t}", "temperature": t, "adaptive": False,
                     "checkpoint_step": 10, "avg@8": acc, "critical_tokens_mean": 10 * t})
        rows.append({**rows[-1], "checkpoint_step": 5, "avg@8": 0.0})  # older: ignored
    rows.append({"run": "x1", "label": "X", "seed": 1, "benchmark": "toy",
                 "setting": "adaptive", "temperature": 0.7, "adaptive": True,
                 "checkpoint_step": 10, "avg@8": 0.55, "critical_tokens_mean": 8.0})
    fig = F.temperature_sweep(pd.DataFrame(rows))
    acc_ax, crit_ax = fig.axes
    lines = lines_by_label(acc_ax)
    assert xy(lines["X fixed T"]) == ([0.3, 0.7, 1.0], [0.2, 0.5, 0.3])
    assert xy(lines["X adaptive"]) == ([0.7], [0.55])
    assert acc_ax.get_ylabel() == "accuracy" and acc_ax.get_xlabel() == "sampling temperature"
    assert xy(lines_by_label(crit_ax)["X fixed T"])[1] == pytest.approx([3.0, 7.0, 10.0])
    assert crit_ax.get_ylabel() == "critical tokens per response"


def test_temperature_sweep_adaptive_without_temperature_is_a_horizontal_line():
    rows = [{"run": "r", "label": "R", "seed": 1, "benchmark": "b", "temperature": 0.5,
             "adaptive": False, "pass@1": 0.4},
            {"run": "r", "label": "R", "seed": 1, "benchmark": "b", "temperature": None,
             "adaptive": True, "pass@1": 0.6}]
    (ax,) = F.temperature_sweep(pd.DataFrame(rows)).axes
    line = lines_by_label(ax)["R adaptive"]
    assert xy(line)[1] == [0.6, 0.6] and line.get_linestyle() == "--"


# ---------------------------------------------------------------- ablation


def test_ablation_deltas_bars_and_error_bars():
    # paired Δ with its 95% CI per variant; AB significant, ABCD not, A has one pair (no CI)
    nan = float("nan")
    summary = pd.DataFrame(
        {"toy/avg@4/final_pair_delta": [nan, 0.04, 0.1, 0.02],
         "toy/avg@4/final_pair_ci_low": [nan, 0.03, -0.02, nan],
         "toy/avg@4/final_pair_ci_high": [nan, 0.05, 0.22, nan],
         "toy/avg@4/final_pair_sig": [nan, 1.0, 0.0, nan],
         "toy/avg@4/final_pair_n": [nan, 5, 5, 1]},
        index=pd.Index(["none", "AB", "ABCD", "A"], name="variant"))
    summary.attrs["baseline"] = "none"
    colors = color_map(["none", "AB", "ABCD", "A"])
    (ax,) = F.ablation_deltas(summary, colors).axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.04, 0.1, 0.02])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["AB\nn=5", "ABCD\nn=5", "A\nn=1"]
    assert [p.get_facecolor()[:3] for p in ax.patches] == [colors["AB"], colors["ABCD"],
                                                           colors["A"]]
    segs = ax.collections[0].get_segments()  # the error bars' LineCollection
    assert segs[0][:, 1].tolist() == pytest.approx([0.03, 0.05])  # the CI of AB
    assert segs[1][:, 1].tolist() == pytest.approx([-0.02, 0.22])
    assert segs[2][:, 1].tolist() == pytest.approx([0.02, 0.02])  # one pair: no bar
    # the marker: only over AB (significant), just above its CI (0.05 + 0.04 * 0.22)
    marks = [(t.get_text(), *t.get_position()) for t in ax.texts]
    assert marks == [("*", 0, pytest.approx(0.05 + 0.04 * 0.22))]
    assert ax.get_title() == "toy/avg@4" and ax.get_ylabel() == "Δ accuracy vs none"


def test_ablation_deltas_without_baseline_is_skipped():
    summary = pd.DataFrame({"toy/avg@4/delta_final": [float("nan")]}, index=["AB"])
    summary.attrs["baseline"] = None
    with pytest.raises(MissingData, match="baseline"):
        F.ablation_deltas(summary)


def test_ablation_curves_per_variant(metrics):
    fig = F.ablation_curves(metrics)
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["val/toy/avg@4", "val/toy/greedy", schema.ENTROPY_MEAN,
                      schema.RESPONSE_LEN_MEAN, schema.REWARD_ACC]
    assert set(lines_by_label(fig.axes[0])) == {"X", "Y"}


# ---------------------------------------------------------------- shared behaviour


def test_colours_are_stable_across_figures(metrics, tokens):
    colors = color_map(["Y", "X"])
    f1 = F.token_entropy(metrics, colors)
    f2 = F.clipping_patterns(metrics, tokens, colors)
    for fig in (f1, f2):
        got = lines_by_label(fig.axes[0])
        x = next(v for k, v in got.items() if k.startswith("X"))
        y = next(v for k, v in got.items() if k.startswith("Y"))
        assert matplotlib.colors.to_rgb(x.get_color()) == colors["X"]
        assert matplotlib.colors.to_rgb(y.get_color()) == colors["Y"]
    assert colors["X"] != colors["Y"]


EMPTY_METRICS = pd.DataFrame({"run": ["r"], "label": ["R"], "seed": [1], "step": [1]})


@pytest.mark.parametrize("build, why", [
    (lambda: F.validation_accuracy(EMPTY_METRICS), "no validation metrics"),
    (lambda: F.token_entropy(EMPTY_METRICS), "actor/entropy_mean"),
    (lambda: F.response_length(EMPTY_METRICS), "response length"),
    (lambda: F.reward_and_fill_rate(EMPTY_METRICS), "reward"),
    (lambda: F.clipping_patterns(EMPTY_METRICS, pd.DataFrame()), "clip"),
    (lambda: F.top_clipped_tokens(pd.DataFrame()), "no token samples"),
    (lambda: F.advantage_balance(EMPTY_METRICS), "advantage mass"),
    (lambda: F.ratio_vs_advantage(pd.DataFrame()), "no token samples"),
    (lambda: F.adaptive_temperature(pd.DataFrame()), "no token samples"),
    (lambda: F.temperature_sweep(pd.DataFrame()), "no eval rows"),
    (lambda: F.dual_entropy_tokens(dual_entropy_table(pd.DataFrame())), "no token string"),
    (lambda: F.ablation_curves(EMPTY_METRICS), "no validation accuracy"),
])
def test_absent_data_raises_missing_data_with_a_reason(build, why):
    with pytest.raises(MissingData, match=why):
        build()
