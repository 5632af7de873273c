"""analysis.report.analyze and analysis.summary on synthetic run directories."""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import ablation_summary, schema, write_summary  # noqa: E402
from analysis.report import analyze, default_out, parse_formats  # noqa: E402
from analysis.synthetic import write_ablation, write_run  # noqa: E402

FIG_NAMES = ["validation_accuracy", "token_entropy", "response_length", "reward_and_fill_rate",
             "clipping_patterns", "top_clipped_tokens", "advantage_balance",
             "ratio_vs_advantage", "adaptive_temperature", "temperature_sweep",
             "dual_entropy_tokens"]

EVALS = [
    {"benchmark": "toy", "setting": f"T={t}", "temperature": t, "adaptive": False,
     "checkpoint_step": 6, "n": 16, "avg@4": 0.5 - abs(t - 0.7),
     "pass@k": {"1": 0.4, "4": 0.6}, "critical_tokens_mean": 3 + t}
    for t in (0.3, 0.7, 1.0)
] + [{"benchmark": "toy", "setting": "adaptive", "temperature": 0.7, "adaptive": True,
      "checkpoint_step": 6, "n": 16, "avg@4": 0.55, "critical_tokens_mean": 4.0}]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run killed mid-line (still 'running', with evals) and a finished run without
    token samples; analysed once (png only: the pdf path is tested on a smaller run)."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "hapo-s1", seed=1, status="running", truncate_last=True, evals=EVALS)
    write_run(root / "dapo-s1", seed=1, token_steps=(), components="none", adaptive=False)
    res = analyze([root / "hapo-s1", root / "dapo-s1"], root / "out", ["png"])
    return root, res


def test_every_figure_written(two_runs):
    root, res = two_runs
    assert res.out_dir == root / "out"
    assert list(res.figures) == FIG_NAMES
    for name, files in res.figures.items():
        assert [f.name for f in files] == [f"{name}.png"]
        assert files[0].read_bytes()[:4] == b"\x89PNG"
    assert res.skipped == {"ablation_deltas": "no ablation directory among the inputs",
                           "ablation_curves": "no ablation directory among the inputs"}
    assert res.runs == ["hapo-s1", "dapo-s1"] and res.warnings == []


def test_report_md_links_every_figure_and_lists_partial_runs(two_runs):
    root, res = two_runs
    md = res.report_md.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == [f"figures/{n}.png" for n in FIG_NAMES]
    assert all((res.out_dir / p).is_file() for p in images)
    assert "Not finished (read up to the last complete record): hapo-s1." in md
    assert "- ablation_deltas: no ablation directory among the inputs" in md
    # the runs table: the truncated run has 6 complete steps, the other no token rows
    assert "| hapo-s1 | hapo | 1 | running | 6 | 6 | 128 | 4 | ABCD |" in md
    assert "| dapo-s1 | dapo | 1 | done | 6 | 6 | 0 | 0 | none |" in md
    # final values: val/toy/avg@4 at step 6, seed 1 = 0.1 + 0.06 + 0.02 = 0.18
    assert "| hapo | 1 | 1 running | 0.180 | 0.180 |" in md
    assert "## Evaluation (latest checkpoint, mean over seeds)" in md


def test_report_html_is_self_contained(two_runs):
    _, res = two_runs
    page = res.report_html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("src='data:image/png;base64,") == len(FIG_NAMES)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # no CDN, no remote asset
    assert "<table>" in page and "hapo-s1" in page


def test_ablation_directory(tmp_path):
    write_ablation(tmp_path / "abl", {"none": 0.0, "AB": 0.05, "ABCD": 0.1},
                   missing=("AB-s2",), token_steps=())  # token figures: see two_runs
    res = analyze([tmp_path / "abl"], None, ["png"])
    assert res.out_dir == tmp_path / "abl" / "analysis"
    assert "ablation_deltas" in res.figures and "ablation_curves" in res.figures
    assert res.skipped["temperature_sweep"] == "no eval rows (eval/*.jsonl from `hapo evaluate`)"
    assert not any(v.startswith("error") for v in res.skipped.values())
    assert (res.out_dir / "summary.csv").is_file() and (res.out_dir / "summary.md").is_file()
    md = res.report_md.read_text()
    assert "## Ablation summary: abl" in md and "Final values per label" not in md
    assert any("AB-s2" in w for w in res.warnings)


def test_ablation_summary_values(tmp_path):
    write_ablation(tmp_path / "abl", {"none": 0.0, "AB": 0.05, "ABCD": 0.1},
                   missing=("AB-s2",), token_steps=())
    df = ablation_summary(tmp_path / "abl")
    assert df.index.tolist() == ["none", "AB", "ABCD"] and df.index.name == "variant"
    assert df["n_seeds"].tolist() == [2, 1, 2]
    # final val/toy/avg@4 at step 6 = 0.1 + 0.06 + 0.02 s + offset:
    #   none: 0.18, 0.20 -> mean 0.19, sample std sqrt(2 * 0.01^2 / 1) = 0.014142
    #   AB (seed 1 only): 0.23;  ABCD: 0.28, 0.30 -> 0.29
    col = "toy/avg@4"
    assert df[f"{col}/final_mean"].tolist() == pytest.approx([0.19, 0.23, 0.29])
    assert df.at["none", f"{col}/final_std"] == pytest.approx(0.0141421356)
    assert math.isnan(df.at["AB", f"{col}/final_std"])
    # best = final here: the synthetic accuracy grows every step
    assert df[f"{col}/best_mean"].tolist() == pytest.approx([0.19, 0.23, 0.29])
    assert df[f"{col}/delta_final"].tolist() == pytest.approx([0.0, 0.04, 0.10])
    # error of the difference: sqrt(se_v^2 + se_b^2), se = std / sqrt(n)
    #   se_none = 0.0141421 / sqrt(2) = 0.01; AB has one seed -> only se_none = 0.01
    #   ABCD: sqrt(0.01^2 + 0.01^2) = 0.0141421
    assert df[f"{col}/delta_final_err"].tolist() == pytest.approx([0.0141421356, 0.01,
                                                                  0.0141421356])
    # final entropy = 1 + 0.1 s - 0.06: none -> 1.04, 1.14 -> mean 1.09
    assert df.at["none", "entropy_final_mean"] == pytest.approx(1.09)
    assert df["response_len_final_mean"].tolist() == pytest.approx([106.0] * 3)
    assert df.attrs["baseline"] == "none" and df.attrs["ablation"] == "abl"

    csv_path, md_path = write_summary(df, tmp_path / "sum")
    back = pd.read_csv(csv_path, index_col="variant")
    assert back[f"{col}/final_mean"].tolist() == pytest.approx([0.19, 0.23, 0.29])
    md = md_path.read_text()
    # the table shows the paired Δ: AB has seed 1 only, so one pair, 0.23 - 0.18 = +0.05 (the
    # unpaired delta_final above, 0.04, set AB's seed 1 against none's seeds 1 and 2): no CI,
    # no p, "n=1" instead of a significance marker
    assert "| AB | 1 | 1 done | 0.230 | 0.230 | n=1 | +0.050 | n=1 | — | n=1 | 1 |" in md
    assert "| none | 2 | 2 done | 0.190 ± 0.014 |" in md


def test_ablation_without_baseline_has_no_deltas(tmp_path):
    write_ablation(tmp_path / "abl", {"AB": 0.0}, seeds=(1,), token_steps=())
    df = ablation_summary(tmp_path / "abl")
    assert df.attrs["baseline"] is None
    assert df["toy/avg@4/delta_final"].isna().all()
    _, md_path = write_summary(df, tmp_path)
    assert "No baseline variant" in md_path.read_text()


def test_write_summary_rejects_non_dataframe(tmp_path):
    with pytest.raises(ValueError, match="got dict"):
        write_summary({}, tmp_path)


@pytest.mark.parametrize("given, expected", [
    (None, ["png", "pdf"]), (["png,pdf"], ["png", "pdf"]), ("pdf", ["pdf"]),
    ([" PNG ", "png"], ["png"]),
])
def test_parse_formats(given, expected):
    assert parse_formats(given) == expected


def test_bad_format_and_bad_input_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="jpg"):
        parse_formats(["png,jpg"])
    with pytest.raises(ValueError, match="neither a run directory"):
        analyze([tmp_path], tmp_path / "out", ["png"])


def test_default_out(tmp_path):
    assert default_out([tmp_path / "a"]) == tmp_path / "a" / "analysis"
    a, b = tmp_path / "x" / "a", tmp_path / "x" / "b"
    a.mkdir(parents=True), b.mkdir()
    assert default_out([a, b]) == (tmp_path / "x").resolve() / "analysis"


def test_run_with_metrics_only_skips_token_figures_with_reasons(tmp_path):
    write_run(tmp_path / "r", steps=3, token_steps=())
    res = analyze([tmp_path / "r"], tmp_path / "out", ["png,pdf"])
    for name, files in res.figures.items():
        assert [f.name for f in files] == [f"{name}.png", f"{name}.pdf"]
        assert files[0].read_bytes()[:4] == b"\x89PNG"
        assert files[1].read_bytes()[:5] == b"%PDF-"
    md = res.report_md.read_text()  # markdown shows the png and links both files
    assert "[png](figures/token_entropy.png), [pdf](figures/token_entropy.pdf)" in md
    assert res.skipped["top_clipped_tokens"].startswith("no token samples")
    assert res.skipped["ratio_vs_advantage"].startswith("no token samples")
    assert "dual_entropy_tokens" in res.skipped
    assert "clipping_patterns" in res.figures  # the curves need no token samples
    assert not any(v.startswith("error") for v in res.skipped.values())


def test_pdf_only_report_still_embeds_png_in_html(tmp_path):
    write_run(tmp_path / "r", steps=2, token_steps=())
    (tmp_path / "r" / schema.METRICS).write_text(  # only entropy logged: one figure
        '{"step": 1, "actor/entropy_mean": 1.0}\n{"step": 2, "actor/entropy_mean": 0.9}\n')
    res = analyze([tmp_path / "r"], tmp_path / "out", ["pdf"])
    assert list(res.figures) == ["token_entropy"]
    assert not (tmp_path / "out" / "figures" / "token_entropy.png").exists()
    assert res.report_html.read_text().count("data:image/png;base64,") == 1
    assert "![" not in res.report_md.read_text()  # no inline image without a png


# ---------------------------------------------------------------- paired statistics
# Five seeds; val/toy/avg@4 at step 6 = 0.16 + 0.02 s + offset (analysis.synthetic), so the
# difference variant - none at seed s is the variant's offset at s.
PAIRED = {
    "none": 0.0,
    "A": {1: 0.01, 2: 0.02, 3: 0.0, 4: 0.03, 5: 0.02},  # A-s3 missing: 4 pairs
    "AB": {1: 0.02, 2: -0.01, 3: 0.03, 4: -0.02, 5: 0.0},  # not significant
    "ABCD": {1: 0.05, 2: 0.04, 3: 0.06, 4: 0.05, 5: 0.05},  # significant
}


@pytest.fixture(scope="module")
def paired_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    write_ablation(root / "abl", PAIRED, seeds=(1, 2, 3, 4, 5), missing=("A-s3",),
                   token_steps=())
    return root / "abl"


def test_paired_summary_by_hand(paired_ablation):
    df = ablation_summary(paired_ablation)
    m = "toy/avg@4/final"
    # ABCD: values .23 .24 .28 .29 .31 -> mean .27, s^2 = .0046 / 4, se = .0151658,
    # CI .27 -+ 2.776 * .0151658 = [.22790, .31210]
    assert df.at["ABCD", f"{m}_mean"] == pytest.approx(0.27)
    assert df.at["ABCD", f"{m}_ci_low"] == pytest.approx(0.27 - 2.776 * 0.0151658, abs=1e-4)
    assert df.at["ABCD", f"{m}_ci_high"] == pytest.approx(0.27 + 2.776 * 0.0151658, abs=1e-4)
    # paired: d = .05 .04 .06 .05 .05 -> Δ .05 -+ 2.776 * .00316228, t^2 = 250, p = 9.35e-5
    assert df.at["ABCD", f"{m}_pair_n"] == 5
    assert df.at["ABCD", f"{m}_pair_delta"] == pytest.approx(0.05)
    assert df.at["ABCD", f"{m}_pair_ci_low"] == pytest.approx(0.05 - 2.776 * 0.00316228,
                                                              abs=1e-5)
    assert df.at["ABCD", f"{m}_pair_p"] == pytest.approx(9.349e-5, rel=1e-2)
    assert df.at["ABCD", f"{m}_pair_sig"] == 1.0
    # AB: d = .02 -.01 .03 -.02 0 -> Δ .004, t = .43133, p = .688: not significant
    assert df.at["AB", f"{m}_pair_delta"] == pytest.approx(0.004)
    assert df.at["AB", f"{m}_pair_p"] == pytest.approx(0.688, abs=1e-3)
    assert df.at["AB", f"{m}_pair_sig"] == 0.0
    # A: seed 3 has no run: pairs 1, 2, 4, 5, d = .01 .02 .03 .02 -> Δ .02, s^2 = .0002 / 3,
    # se = .0040825, t = 4.899 (t^2 = 24) with 3 dof: p = 1 - (2/pi)(atan(sqrt 8) + sqrt 8 / 9)
    # = .01628; CI .02 -+ 3.182 * .0040825
    assert df.at["A", f"{m}_pair_n"] == 4 and df.at["A", f"{m}_n"] == 4
    assert df.at["A", f"{m}_pair_delta"] == pytest.approx(0.02)
    assert df.at["A", f"{m}_pair_p"] == pytest.approx(
        1 - 2 / math.pi * (math.atan(math.sqrt(8)) + math.sqrt(8) / 9), abs=1e-6)
    assert df.at["A", f"{m}_pair_ci_high"] == pytest.approx(0.02 + 3.182 * 0.0040825, abs=1e-5)
    assert math.isnan(df.at["none", f"{m}_pair_delta"])  # the baseline is not paired


def test_report_and_figure_mark_significance(paired_ablation, tmp_path):
    res = analyze([paired_ablation], tmp_path / "out", ["png"])
    assert "ablation_deltas" in res.figures
    md = res.report_md.read_text()
    # the report's table: Δ, its CI, p, the marker and the pair count, per variant
    assert ("| ABCD | 5 | 5 done | 0.270 ± 0.034 | 0.270 ± 0.034 | [0.228, 0.312] | +0.050 | "
            "[+0.041, +0.059] | <0.001 | * | 5 |") in md
    # AB: .20 .19 .25 .22 .26 -> mean .224, s^2 = .00372 / 4, s = .0305
    assert "| AB | 5 | 5 done | 0.224 ± 0.030 |" in md
    assert "| +0.004 | [-0.022, +0.030] | 0.688 | n.s. | 5 |" in md
    assert "| +0.020 | [+0.007, +0.033] | 0.016 | * | 4 |" in md  # A: 4 pairs
    assert "n.s. = not significant" in md
    # the figure drawn from the same summary: bars = paired Δ, error bars = the 95% CI,
    # "*" over A and ABCD only
    from analysis import figures as F

    df = ablation_summary(paired_ablation)
    (ax,) = F.ablation_deltas(df).axes[:1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A\nn=4", "AB\nn=5", "ABCD\nn=5"]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.02, 0.004, 0.05])
    segs = ax.collections[0].get_segments()
    assert segs[1][:, 1].tolist() == pytest.approx([0.004 - 2.776 * 0.0092736,
                                                    0.004 + 2.776 * 0.0092736], abs=1e-4)
    assert [t.get_position()[0] for t in ax.texts if t.get_text() == "*"] == [0, 2]


def test_released_vs_paper_table(tmp_path):
    # ABCD-released - ABCD per seed: -.02 -.01 -.02 -> Δ -.016667, s = .0057735,
    # se = .0033333, t = -5 with 2 dof: p = 1 - 5 / sqrt(27) = .03775 (the t(2) CDF is
    # 1/2 + t / (2 sqrt(t^2 + 2))); CI -.016667 -+ 4.303 * .0033333 = [-.031, -.002]
    write_ablation(tmp_path / "abl", {"none": 0.0, "ABCD": {1: 0.05, 2: 0.06, 3: 0.04},
                                      "ABCD-released": {1: 0.03, 2: 0.05, 3: 0.02}},
                   seeds=(1, 2, 3), token_steps=())
    df = ablation_summary(tmp_path / "abl")
    assert df["reference"].tolist() == ["", "", "ABCD"]
    m = "toy/avg@4/final"
    assert df.at["ABCD-released", f"{m}_ref_delta"] == pytest.approx(-0.05 / 3)
    assert df.at["ABCD-released", f"{m}_ref_p"] == pytest.approx(1 - 5 / math.sqrt(27),
                                                                 abs=1e-6)
    assert math.isnan(df.at["ABCD", f"{m}_ref_delta"])
    res = analyze([tmp_path / "abl"], tmp_path / "out", ["png"])
    md = res.report_md.read_text()
    assert "### Released vs paper entropy normalisation (paired by seed)" in md
    assert "| ABCD-released | ABCD | -0.017 | [-0.031, -0.002] | 0.038 | * | 3 |" in md
    assert "## Released vs paper" in (res.out_dir / "summary.md").read_text()


# ---------------------------------------------------------------- --baselines: Table 1 layout
# `hapo ablate --baselines dapo,grpo,dr-grpo --variants none,ABCD|AB` names its variants
# '<baseline>-<letters>' and has no 'none'; each must pair with its own '<baseline>-none'.
# Offsets (= the accuracy difference to an offset-0 run at the same seed, analysis.synthetic)
# put the baselines far apart, so a pairing with another baseline's 'none' reads off by >= .1.
TABLE1 = {
    "dapo-none": 0.0,
    "dapo-ABCD": {1: 0.05, 2: 0.04, 3: 0.06},  # d = .05 .04 .06 vs dapo-none
    "dapo-ABCD-released": {1: 0.03, 2: 0.05, 3: 0.02},
    "grpo-none": 0.10,
    "grpo-ABCD": {1: 0.15, 2: 0.14, 3: 0.16},  # d = .05 .04 .06 vs grpo-none (not .15 ...)
    "dr-grpo-none": -0.10,
    "dr-grpo-AB": {1: -0.08, 2: -0.09, 3: -0.07},  # d = .02 .01 .03 vs dr-grpo-none
}


def test_baseline_pairs_by_prefix():
    from analysis.summary import baseline_pairs

    assert baseline_pairs(TABLE1) == {
        "dapo-ABCD": "dapo-none", "dapo-ABCD-released": "dapo-none",
        "grpo-ABCD": "grpo-none", "dr-grpo-AB": "dr-grpo-none"}  # longest prefix: not 'grpo'
    assert baseline_pairs(["none", "A", "grpo-none"]) == {"A": "none", "grpo-none": "none"}
    assert baseline_pairs(["gspo-AB", "A"]) == {}  # no baseline run: nothing paired


def test_baselines_summary_pairs_each_with_its_own_none(tmp_path):
    write_ablation(tmp_path / "abl", TABLE1, seeds=(1, 2, 3), token_steps=(),
                   missing=("grpo-ABCD-s3",))
    df = ablation_summary(tmp_path / "abl")
    m = "toy/avg@4/final"
    assert df["vs"].tolist() == ["", "dapo-none", "dapo-none", "", "grpo-none", "",
                                 "dr-grpo-none"]
    # dapo-ABCD: d = .05 .04 .06 -> Δ .05, s = .01, se = .01 / sqrt 3 = .0057735, t^2 = 75,
    # 2 dof: p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(75 / 77) = .013072
    assert df.at["dapo-ABCD", f"{m}_pair_delta"] == pytest.approx(0.05)
    assert df.at["dapo-ABCD", f"{m}_pair_p"] == pytest.approx(1 - math.sqrt(75 / 77), abs=1e-6)
    # grpo-ABCD (seed 3 missing): d = .05 .04 -> Δ .045, 2 pairs; s = .0070711, se = .005,
    # t = 9, 1 dof: p = 1 - (2/pi) atan 9 = .070487. Against dapo-none it would be .145.
    assert df.at["grpo-ABCD", f"{m}_pair_n"] == 2
    assert df.at["grpo-ABCD", f"{m}_pair_delta"] == pytest.approx(0.045)
    assert df.at["grpo-ABCD", f"{m}_pair_p"] == pytest.approx(1 - 2 / math.pi * math.atan(9),
                                                              abs=1e-6)
    # dr-grpo-AB: d = .02 .01 .03 -> Δ .02, t^2 = 12: p = 1 - sqrt(12 / 14) = .074180, n.s.
    assert df.at["dr-grpo-AB", f"{m}_pair_delta"] == pytest.approx(0.02)
    assert df.at["dr-grpo-AB", f"{m}_pair_p"] == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-6)
    assert df.at["dr-grpo-AB", f"{m}_pair_sig"] == 0.0
    # the unpaired difference of means, also against the row's own baseline (equal steps)
    assert df.at["dr-grpo-AB", "toy/avg@4/delta_final"] == pytest.approx(0.02)
    for base in ("dapo-none", "grpo-none", "dr-grpo-none"):
        assert math.isnan(df.at[base, f"{m}_pair_delta"])
        assert df.at[base, "toy/avg@4/delta_final"] == pytest.approx(0.0)
    # released vs paper stays within the baseline: dapo-ABCD-released vs dapo-ABCD
    assert df.at["dapo-ABCD-released", "reference"] == "dapo-ABCD"
    assert df.at["dapo-ABCD-released", f"{m}_ref_delta"] == pytest.approx(-0.05 / 3)

    out = write_summary(df, tmp_path / "sum")[1].read_text()
    assert "column vs: `dapo-none`, `dr-grpo-none`, `grpo-none`" in out
    assert "| dapo-none | | 3 | 3 done |" in out.replace("|  |", "| |")
    row = next(ln for ln in out.splitlines() if ln.startswith("| dr-grpo-AB |"))
    assert "| dr-grpo-none |" in row and "| +0.020 | [-0.005, +0.045] | 0.074 | n.s. | 3 |" in row
    base_row = next(ln for ln in out.splitlines() if ln.startswith("| grpo-none |"))
    assert "| baseline |" in base_row

    from analysis import figures as F

    (ax,) = F.ablation_deltas(df).axes[:1]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "dapo-ABCD\nvs dapo-none\nn=3", "dapo-ABCD-released\nvs dapo-none\nn=3",
        "grpo-ABCD\nvs grpo-none\nn=2", "dr-grpo-AB\nvs dr-grpo-none\nn=3"]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.05, 0.05 - 0.05 / 3,
                                                                  0.045, 0.02])
