"""Figures a reader can trust (issue 29), checked on the axes' data:

- no blank panel: every axis shows data or a text saying why it has none;
- an honest y range: values that vary by less than 10 % of their size are drawn on an axis
  that includes zero (critical tokens 4.194-4.199 read as flat, not as a steep trend);
- per-step curves smoothed with an EMA, the raw values faint behind;
- one colour per variant in every figure and every report;
- no reference to a file or issue the repository does not hold.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis import schema  # noqa: E402
from analysis.colors import FIXED, color_map  # noqa: E402
from analysis.figures._common import EMPTY_GID, REFERENCE_GID, ema, honest_ylim  # noqa: E402
from analysis.io import load_paths, stack_evals, stack_metrics, stack_tokens  # noqa: E402
from analysis.synthetic import write_ablation  # noqa: E402
from analysis.tables import dual_entropy_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lines_by_label(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines()}


def ydata(line) -> list[float]:
    return list(np.asarray(line.get_ydata(), float))


def shows_data(ax) -> bool:
    """A line with a finite value (not a reference line), bars or steps, points or a band."""
    if any(ln.get_gid() != REFERENCE_GID and np.isfinite(np.asarray(ln.get_ydata(), float)).any()
           for ln in ax.get_lines()):
        return True
    if ax.patches:
        return True
    return any(len(c.get_offsets()) if isinstance(c, PathCollection)  # scatter: its points
               else any(len(p.vertices) for p in c.get_paths()) for c in ax.collections)


def says_why(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts if t.get_gid() == EMPTY_GID)


def crit_evals(values: dict[float, float], acc: dict[float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"run": "r", "label": "ABCD", "seed": 1, "benchmark": "arith",
                          "temperature": t, "adaptive": False, "checkpoint_step": 150,
                          "avg@8": acc[t], "critical_tokens_mean": v}
                         for t, v in values.items()])


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    """none and ABCD, two seeds, 8 steps; no sampled token clipped on the high side;
    critical tokens per response 4.194-4.199 across temperatures."""
    path = tmp_path_factory.mktemp("trust") / "abl"
    write_ablation(path, {"none": 0.0, "ABCD": 0.03}, seeds=(1, 2), steps=8,
                   token_steps=(2, 8))
    for run in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in (run / schema.TOKENS_DIR).glob("*.parquet"):
            t = pd.read_parquet(f)
            t.loc[t["clip_side"] == "high", "clip_side"] = "none"
            t.to_parquet(f, index=False)
        rows = crit_evals({0.5: 4.194, 0.8: 4.199, 1.0: 4.196},
                          {0.5: 0.53, 0.8: 0.52, 1.0: 0.51})
        (run / schema.EVAL_DIR).mkdir(exist_ok=True)
        (run / schema.EVAL_DIR / "sweep.jsonl").write_text(
            rows.drop(columns=["run", "label", "seed"]).to_json(orient="records", lines=True))
    return path


def all_figures(path: Path, smooth: float = 0.8) -> dict:
    coll = load_paths([path])
    m, tok, ev = stack_metrics(coll.runs), stack_tokens(coll.runs), stack_evals(coll.runs)
    c = color_map(coll.labels)
    return {
        "validation_accuracy": F.validation_accuracy(m, c),
        "token_entropy": F.token_entropy(m, c, smooth=smooth),
        "response_length": F.response_length(m, c, smooth=smooth),
        "reward_and_fill_rate": F.reward_and_fill_rate(m, c, smooth=smooth),
        "clipping_patterns": F.clipping_patterns(m, tok, c, smooth=smooth),
        "top_clipped_tokens": F.top_clipped_tokens(tok, c),
        "advantage_balance": F.advantage_balance(m, c, smooth=smooth),
        "ratio_vs_advantage": F.ratio_vs_advantage(tok, c),
        "adaptive_temperature": F.adaptive_temperature(tok, m, c, smooth=smooth),
        "temperature_sweep": F.temperature_sweep(ev, c),
        "dual_entropy_tokens": F.dual_entropy_tokens(dual_entropy_table(tok)),
        "ablation_curves": F.ablation_curves(m, c, smooth=smooth),
    }


# ---------------------------------------------------------------- no blank panels


def test_every_panel_of_every_figure_has_data_or_says_why(ablation):
    for name, fig in all_figures(ablation).items():
        for ax in fig.axes:
            assert shows_data(ax) or says_why(ax), f"{name}: panel {ax.get_title()!r} is blank"


def test_clipping_patterns_without_high_side_clips_says_so_in_the_panel(ablation):
    fig = all_figures(ablation)["clipping_patterns"]
    low, high, hist_low, hist_high = fig.axes  # a full 2 x 2 grid: no quarter left blank
    assert hist_low.patches and not says_why(hist_low)
    assert not hist_high.patches
    # 64 tokens per step, 2 steps, 4 runs
    assert says_why(hist_high) == ("no sampled token was clipped on the high side\n"
                                   "(512 tokens sampled at 2 steps of 4 runs)")
    assert hist_high.get_title() == "entropy of high-side clipped tokens"
    assert not hist_high.get_xticks().size and not hist_high.get_yticks().size


def test_clipping_patterns_with_no_curve_for_a_side_says_which_metric_is_missing():
    m = pd.DataFrame({"run": "r", "label": "R", "seed": 1, "step": [1, 2, 3],
                      schema.CLIP_FRAC_LOW: [0.01, 0.02, 0.015]})
    low, high = F.clipping_patterns(m).axes
    assert ydata(lines_by_label(low)["R all tokens"]) == pytest.approx([0.01, 0.02, 0.015])
    assert not shows_data(high) and schema.CLIP_FRAC_HIGH in says_why(high)


def test_ratio_vs_advantage_with_no_high_entropy_token_says_so():
    tok = pd.DataFrame({"run": "r", "label": "R", "seed": 1, "step": 1,
                        "ratio": [0.9, 1.1], "adv": [1.0, -1.0], "h": [-0.5, -0.2]})
    hi, lo = F.ratio_vs_advantage(tok).axes
    assert says_why(hi) == "no sampled token with h > 0" and shows_data(lo)


def test_ablation_delta_without_pairs_is_no_bar_and_says_so():
    nan = float("nan")
    summary = pd.DataFrame({"toy/avg@4/final_pair_delta": [nan, 0.04, nan],
                            "toy/avg@4/final_pair_ci_low": [nan, 0.03, nan],
                            "toy/avg@4/final_pair_ci_high": [nan, 0.05, nan],
                            "toy/avg@4/final_pair_sig": [nan, 0.0, nan],
                            "toy/avg@4/final_pair_n": [nan, 3, 0]},
                           index=pd.Index(["none", "AB", "A"], name="variant"))
    summary.attrs["baseline"] = "none"
    (ax,) = F.ablation_deltas(summary).axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.04])  # no 0-height bar
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("no pairs", 1)]


# ---------------------------------------------------------------- honest y range


def test_critical_tokens_panel_includes_zero(ablation):
    acc_ax, crit_ax = all_figures(ablation)["temperature_sweep"].axes
    assert ydata(lines_by_label(crit_ax)["ABCD fixed T"]) == pytest.approx([4.194, 4.199, 4.196])
    lo, hi = crit_ax.get_ylim()
    assert lo <= 0.0 < 4.199 <= hi
    assert acc_ax.get_ylim()[0] <= 0.0  # 0.51-0.53: 4 % of 0.53, under 10 %: zero too


def test_a_wide_range_keeps_its_autoscaled_axis():
    ev = crit_evals({0.5: 3.0, 1.0: 8.0}, {0.5: 0.2, 1.0: 0.8})
    acc_ax, crit_ax = F.temperature_sweep(ev).axes
    assert crit_ax.get_ylim()[0] > 2.0 and acc_ax.get_ylim()[0] > 0.1


@pytest.mark.parametrize("y, widened, ylim", [
    ([4.194, 4.199], True, (0.0, 1.05 * 4.199)),      # 0.12 % of 4.199: zero included
    ([100.0, 109.0], True, (0.0, 1.05 * 109.0)),      # 8.3 %
    ([100.0, 112.0], False, None),                    # 10.7 %: kept
    ([-5.01, -5.0], True, (-1.05 * 5.01, 0.0)),       # all negative: zero on top
    ([-0.1, 0.1], False, None),                       # signed: its zero is in range
])
def test_honest_ylim_rule(y, widened, ylim):
    fig = matplotlib.figure.Figure()
    ax = fig.subplots()
    ax.plot([1, 2], y)
    ax.axhline(1000.0, gid=REFERENCE_GID)  # a reference line is not data
    before = ax.get_ylim()
    assert honest_ylim(ax) is widened
    assert ax.get_ylim() == (pytest.approx(ylim) if widened else before)


# ---------------------------------------------------------------- smoothing


def test_ema_is_the_debiased_recurrence_and_skips_nan():
    # w = 0.5: s = 0.5, 1.75, 1.875; debiased by 1 - 0.5^k = 0.5, 0.75, 0.875
    assert ema(np.array([1.0, 3.0, 2.0]), 0.5) == pytest.approx([1.0, 7 / 3, 15 / 7])
    out = ema(np.array([1.0, np.nan, 3.0]), 0.5)
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([1.0, 7 / 3])
    assert ema(np.array([1.0, 3.0, 2.0]), 0.0) == pytest.approx([1.0, 3.0, 2.0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema(np.array([1.0]), 1.0)


def test_per_step_curve_is_smoothed_with_the_raw_values_faint_behind():
    m = pd.DataFrame({"run": "r", "label": "R", "seed": 1, "step": [1, 2, 3],
                      schema.ENTROPY_MEAN: [1.0, 3.0, 2.0]})
    (ax,) = F.token_entropy(m, smooth=0.5).axes
    lines = lines_by_label(ax)
    assert set(lines) == {"R", "_R raw"}
    smooth, raw = lines["R"], lines["_R raw"]
    assert ydata(smooth) == pytest.approx([1.0, 7 / 3, 15 / 7])
    assert ydata(raw) == [1.0, 3.0, 2.0]
    assert raw.get_alpha() < 0.5 and raw.get_linewidth() < smooth.get_linewidth()
    assert to_rgb(raw.get_color()) == to_rgb(smooth.get_color())
    assert ax.get_legend_handles_labels()[1] == ["R"]  # the raw line stays out of the legend
    (ax,) = F.token_entropy(m).axes  # smooth=0: the raw line only
    assert set(lines_by_label(ax)) == {"R"} and ydata(ax.get_lines()[0]) == [1.0, 3.0, 2.0]


def test_validation_accuracy_stays_raw_in_the_ablation_curves(ablation):
    fig = all_figures(ablation)["ablation_curves"]
    val_ax, ent_ax = fig.axes[0], fig.axes[2]
    assert not [k for k in lines_by_label(val_ax) if k.endswith(" raw")]
    assert {"_none raw", "_ABCD raw"} <= set(lines_by_label(ent_ax))


def test_analyze_smooth_option(ablation, tmp_path):
    from hapo_cli.cli import app

    runner = CliRunner()
    out = tmp_path / "a"
    res = runner.invoke(app, ["analyze", str(ablation), "--out", str(out), "--format", "png",
                              "--smooth", "0"])
    assert res.exit_code == 0, res.output
    assert "Per-step curves raw (--smooth 0)." in (out / "report.md").read_text()
    res = runner.invoke(app, ["analyze", str(ablation), "--smooth", "1.5"])
    assert res.exit_code == 2 and "--smooth" in res.output


# ---------------------------------------------------------------- colours


def test_a_variant_has_one_colour_whatever_the_order_or_company():
    a = color_map(["ABCD", "none"])
    b = color_map(["run-x", "none", "A", "ABCD"])
    c = color_map(["ablation-2/none", "ablation-2/ABCD"])  # labels of several ablations
    assert a["ABCD"] == b["ABCD"] == c["ablation-2/ABCD"] == to_rgb(FIXED["ABCD"])
    assert a["none"] == b["none"] == c["ablation-2/none"] == to_rgb(FIXED["none"])
    assert b["run-x"] not in (b["none"], b["A"], b["ABCD"])  # a free colour, not a variant's
    both = color_map(["x/none", "y/none"])  # two ablations' baselines: still two colours
    assert both["x/none"] != both["y/none"]


def test_the_colour_of_a_variant_is_equal_across_figures(ablation):
    figs = all_figures(ablation)
    want = {v: to_rgb(FIXED[v]) for v in ("none", "ABCD")}
    for name in ("token_entropy", "response_length", "ablation_curves", "temperature_sweep"):
        lines = lines_by_label(figs[name].axes[0])
        for v, rgb in want.items():
            got = [to_rgb(ln.get_color()) for k, ln in lines.items()
                   if k.split(" ")[0].lstrip("_") == v]
            assert got and set(got) == {rgb}, (name, v)
    hist = figs["clipping_patterns"].axes[2]
    assert {to_rgb(p.get_edgecolor()) for p in hist.patches} == set(want.values())


# ---------------------------------------------------------------- references


def test_the_analysis_code_cites_only_what_the_repository_holds():
    for path in sorted((ROOT / "analysis").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bissue \d+", text), f"{path}: cites an issue number"
        for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text):
            assert (ROOT / name).exists(), f"{path}: cites {name}, not in the repository"
