"""analysis.schema and analysis.io: reading run and ablation directories."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from analysis import schema
from analysis.io import (
    aggregate_seeds,
    load_ablation,
    load_evals,
    load_metrics,
    load_paths,
    load_run,
    read_jsonl,
    run_label,
    stack_metrics,
)
from analysis.synthetic import write_ablation, write_run

# ---------------------------------------------------------------- schema


def test_schema_names_are_the_agreed_strings():
    assert schema.RECIPE == "recipe.yaml" and schema.MANIFEST == "manifest.json"
    assert schema.METRICS == "metrics.jsonl" and schema.ABLATION == "ablation.json"
    assert schema.tokens_file(7) == "tokens/step-000007.parquet"
    assert schema.checkpoint_dir(120) == "checkpoints/step-000120"
    assert schema.val_metric("aime24", 8) == "val/aime24/avg@8"
    assert schema.val_greedy_metric("toy") == "val/toy/greedy"
    assert schema.parse_val_metric("val/aime24/avg@8") == ("aime24", "avg@8")
    assert schema.parse_val_metric("val/toy/greedy") == ("toy", "greedy")
    assert schema.parse_val_metric("actor/entropy_mean") is None
    assert schema.parse_val_metric(schema.val_metric("math/500", 4)) == ("math/500", "avg@4")
    assert schema.eval_setting(0.5, False) == "T=0.5"
    assert schema.eval_setting(None, True) == "adaptive"
    assert schema.ablation_run_dir("AB", 1) == "AB-s1"
    assert "adv/seq_neg_token_sum" in schema.METRICS_NAMES
    assert len(set(schema.METRICS_NAMES)) == len(schema.METRICS_NAMES)
    assert all("/" in n for n in schema.METRICS_NAMES)


@pytest.mark.parametrize("bench, k", [("", 4), ("toy", 0)])
def test_val_metric_rejects_bad_input(bench, k):
    with pytest.raises(ValueError, match="got"):
        schema.val_metric(bench, k)


# ---------------------------------------------------------------- jsonl and metrics


def test_truncated_last_line_is_dropped_silently(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    rows, notes = read_jsonl(p)
    assert rows == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    assert notes == []


def test_corrupt_middle_line_is_skipped_with_its_line_number(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n\n{"step": 3}\n')
    rows, notes = read_jsonl(p)
    assert [r["step"] for r in rows] == [1, 3]
    assert len(notes) == 1 and "m.jsonl:2" in notes[0]


def test_metrics_rows_of_one_step_merge_last_value_wins(tmp_path):
    p = tmp_path / schema.METRICS
    rows = [
        {"step": 2, "reward/acc": 0.5},
        {"step": 1, "reward/acc": 0.1},
        {"step": 2, "val/toy/avg@4": 0.3},  # validation logged in its own row
        {"step": 2, "reward/acc": 0.6},  # resumed run re-logged step 2
        {"reward/acc": 9.0},  # no step: skipped with a note
        {"step": 3, "actor/grad_norm": float("inf")},  # json.dumps writes Infinity
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, notes = load_metrics(p)
    assert df["step"].tolist() == [1, 2, 3]
    assert df["reward/acc"].tolist()[:2] == [0.1, 0.6]
    assert df["actor/grad_norm"].isna().all()  # inf -> NaN
    assert df["val/toy/avg@4"].isna().tolist() == [True, False, True]
    assert df.loc[1, "val/toy/avg@4"] == 0.3
    assert len(notes) == 1 and "no integer 'step'" in notes[0]


def test_missing_metrics_file_gives_an_empty_frame(tmp_path):
    df, notes = load_metrics(tmp_path / "absent.jsonl")
    assert len(df) == 0 and list(df.columns) == ["step"] and notes == []


# ---------------------------------------------------------------- runs


def test_partial_run_without_tokens(tmp_path):
    written = write_run(tmp_path / "r", steps=4, seed=3, status="running", token_steps=(),
                        truncate_last=True)
    run = load_run(tmp_path / "r")
    assert run.status == "running" and run.seed == 3
    assert run.metrics["step"].tolist() == [1, 2, 3, 4]  # the torn step-5 line is gone
    assert run.metrics[schema.ENTROPY_MEAN].tolist() == [r[schema.ENTROPY_MEAN] for r in written]
    assert len(run.tokens) == 0 and set(schema.TOKEN_COLUMNS) <= set(run.tokens.columns)
    assert run.warnings == []
    assert run.recipe["seed"] == 3


def test_run_with_tokens_concatenates_step_files(tmp_path):
    write_run(tmp_path / "r", token_steps=(1, 3))
    run = load_run(tmp_path / "r")
    # synthetic_tokens writes 64 rows per step file: 2 files -> 128 rows
    assert len(run.tokens) == 128
    assert sorted(run.tokens["step"].unique().tolist()) == [1, 3]
    assert set(run.tokens["clip_side"]) <= set(schema.CLIP_SIDES)


def test_unreadable_token_file_is_skipped_with_a_note(tmp_path):
    write_run(tmp_path / "r", token_steps=(1,))
    (tmp_path / "r" / schema.tokens_file(2)).write_bytes(b"PAR1 torn")
    run = load_run(tmp_path / "r")
    assert len(run.tokens) == 64
    assert any("step-000002.parquet" in w for w in run.warnings)


def test_evals_flatten_pass_at_k(tmp_path):
    (tmp_path / "eval").mkdir()
    row = {"benchmark": "toy", "setting": "T=0.5", "temperature": 0.5, "adaptive": False,
           "checkpoint_step": 10, "avg@4": 0.4, "pass@k": {"1": 0.4, "4": 0.7}}
    (tmp_path / "eval" / "sweep.jsonl").write_text(json.dumps(row) + "\n" + '{"bench')
    df, notes = load_evals(tmp_path)
    assert len(df) == 1 and notes == []
    assert df.loc[0, "pass@1"] == 0.4 and df.loc[0, "pass@4"] == 0.7
    assert "pass@k" not in df.columns and df.loc[0, "source"] == "sweep"


def test_not_a_run_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="neither a run directory"):
        load_paths([tmp_path])
    with pytest.raises(ValueError, match="not a directory"):
        load_paths([tmp_path / "nope"])


@pytest.mark.parametrize(
    "name, seed, label",
    [("hapo-s1", 1, "hapo"), ("hapo_seed2", 2, "hapo"), ("hapo-seed-3", 3, "hapo"),
     ("hapo-s1", 2, "hapo-s1"), ("hapo-s1", None, "hapo-s1"), ("s1", 1, "s1")],
)
def test_run_label_strips_only_the_matching_seed(name, seed, label):
    assert run_label(name, seed) == label


def test_seeds_of_plain_runs_share_a_label(tmp_path):
    write_run(tmp_path / "grpo-s1", seed=1, token_steps=())
    write_run(tmp_path / "grpo-s2", seed=2, token_steps=())
    coll = load_paths([tmp_path])  # a folder of run directories
    assert [r.label for r in coll.runs] == ["grpo", "grpo"]
    assert coll.labels == ["grpo"]


# ---------------------------------------------------------------- ablations


def test_ablation_plan_status_and_labels(tmp_path):
    write_ablation(tmp_path / "abl", {"none": 0.0, "AB": 0.05}, seeds=(1, 2),
                   missing=("AB-s2",), token_steps=())
    abl = load_ablation(tmp_path / "abl")
    assert abl.name == "abl"
    assert abl.plan["run_dir"].tolist() == ["none-s1", "none-s2", "AB-s1", "AB-s2"]
    assert abl.plan["status"].tolist() == ["done", "done", "done", "failed"]
    assert [(r.label, r.variant, r.seed) for r in abl.runs] == [
        ("none", "none", 1), ("none", "none", 2), ("AB", "AB", 1)]
    assert len(abl.warnings) == 1 and "AB-s2" in abl.warnings[0]


def test_two_ablations_get_prefixed_labels_and_unique_names(tmp_path):
    write_ablation(tmp_path / "a1", {"none": 0.0}, seeds=(1,), token_steps=())
    write_ablation(tmp_path / "a2", {"none": 0.0}, seeds=(1,), token_steps=())
    coll = load_paths([tmp_path / "a1", tmp_path / "a2"])
    assert [r.label for r in coll.runs] == ["a1/none", "a2/none"]
    assert len({r.name for r in coll.runs}) == 2


def test_bad_ablation_spec(tmp_path):
    (tmp_path / schema.ABLATION).write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="'plan' list"):
        load_ablation(tmp_path)


# ---------------------------------------------------------------- aggregation


def test_aggregate_seeds_mean_and_sample_std():
    long = pd.DataFrame({
        "run": ["a", "a", "b", "b", "c"], "label": ["X", "X", "X", "X", "Y"],
        "seed": [1, 1, 2, 2, 1], "step": [1, 2, 1, 2, 1],
        "m": [1.0, 2.0, 3.0, None, 5.0],
    })
    agg = aggregate_seeds(long, "m")
    # X step 1: values 1, 3 -> mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    # X step 2: only seed 1 (seed 2 stopped) -> mean 2, std 0, n 1;  Y step 1: 5
    assert agg["label"].tolist() == ["X", "X", "Y"]
    assert agg["step"].tolist() == [1, 2, 1]
    assert agg["mean"].tolist() == [2.0, 2.0, 5.0]
    assert agg["std"].tolist() == pytest.approx([2**0.5, 0.0, 0.0])
    assert agg["n"].tolist() == [2, 1, 1]


def test_stack_metrics_tags_rows(tmp_path):
    write_run(tmp_path / "r", steps=2, seed=5, token_steps=())
    long = stack_metrics([load_run(tmp_path / "r")])
    assert long[["run", "label", "seed"]].drop_duplicates().values.tolist() == [["r", "r", 5]]


# ---------------------------------------------------------------- no torch


def test_analysis_imports_without_torch_or_hapo_cli():
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "hapo_cli", "transformers"):
                    raise ImportError(f"blocked import of {name}")
                return None
        sys.meta_path.insert(0, Block())
        import analysis, analysis.schema, analysis.io, analysis.figures, analysis.report
        import analysis.summary, analysis.synthetic, analysis.tables
        assert callable(analysis.ablation_summary) and callable(analysis.analyze)
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "hapo_cli")]
        assert not bad, bad
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_schema_import_is_standard_library_only():
    code = ("import sys; import analysis.schema; "
            "print(sorted(m for m in ('pandas', 'numpy', 'matplotlib') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_eval_rows_with_their_own_seed_column_load(tmp_path):
    """`hapo evaluate` rows carry run-like keys (a sampling seed); tagging must not clash."""
    import json

    from analysis.io import load_paths, stack_evals
    from analysis.synthetic import write_run

    run = tmp_path / "run"
    write_run(run, seed=1)
    row = {"benchmark": "arith", "setting": "T=0.5", "temperature": 0.5, "adaptive": False,
           "checkpoint_step": 6, "n": 4, "avg@4": 0.5, "seed": 7, "label": "x",
           "critical_tokens_mean": 3.0, "critical_entropy_threshold": 1.0}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "extra.jsonl").write_text(json.dumps(row) + "\n")
    df = stack_evals(load_paths([run]).runs)
    got = df[df["setting"] == "T=0.5"]
    assert (got["seed"] == 1).all() and (got["seed_file"] == 7).any()
    assert (got["label_file"] == "x").any()


def test_checkpoint_names_and_the_manifest_reader(tmp_path):
    assert schema.checkpoint_step("step-000120") == 120
    assert [schema.checkpoint_step(n) for n in (".step-000002.tmp", "step-", "step-1x")] == [
        None, None, None]
    assert schema.checkpoint_step(schema.checkpoint_dir(7).split("/")[-1]) == 7
    assert schema.read_manifest(tmp_path) == {}
    (tmp_path / schema.MANIFEST).write_text("[1, 2]")
    assert schema.read_manifest(tmp_path) == {}
    (tmp_path / schema.MANIFEST).write_bytes(b"\xff\xfe")
    assert schema.read_manifest(tmp_path) == {}
    (tmp_path / schema.MANIFEST).write_text('{"status": "done"}')
    assert schema.read_manifest(tmp_path) == {"status": "done"}
