"""Reliability of what evaluate, analyze and ablate --summary write and report (issue 30):
earlier results are never replaced unasked, runs are averaged only when they are seeds of one
recipe, a summary states the step it compares, a live run's rotating checkpoints and a live
ablation's summary are left alone, and every problem is one line."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from test_reliability import copy_run, one_error_line, snapshot, train_args  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from analysis import schema  # noqa: E402
from analysis.io import load_paths, load_run  # noqa: E402
from analysis.synthetic import write_ablation, write_run  # noqa: E402
from hapo_cli.cli import app  # noqa: E402

runner = CliRunner()
QUICK = ["--bench", "arith", "--n", "1", "--limit", "2"]  # seconds per evaluation


def eval_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def lines_starting(res, prefix: str) -> list[str]:
    return [x for x in res.output.splitlines() if x.startswith(prefix)]


@pytest.fixture(scope="module")
def run2(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (each test copies it)."""
    out = tmp_path_factory.mktemp("done") / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 2, "log.checkpoint_every=1",
                                        "eval.at_start=false"))
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------------------
# 1. an evaluation never replaces an earlier one unasked
# ---------------------------------------------------------------------------------------------


def test_second_evaluation_under_the_same_name_is_refused(tmp_path, run2):
    run = copy_run(run2, tmp_path / "run")
    ev = run / schema.EVAL_DIR
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--temperature", "0.5,adaptive"])
    assert res.exit_code == 0, res.output
    first = eval_rows(ev / "eval.jsonl")
    assert [r["setting"] for r in first] == ["T=0.5", "adaptive"]
    # every row names the settings it was sampled with
    assert {(r["n"], r["top_p"], r["top_k"], r["limit"], r["sampling_seed"], r["engine"])
            for r in first} == {(1, 0.7, 0, 2, 0, "hf")}
    before = snapshot(ev)
    assert sorted(before) == ["eval-samples.jsonl", "eval.jsonl"]

    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--temperature", "1.0"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == (
        f"error: {ev / 'eval.jsonl'}: exists (2 rows from an earlier evaluation); pass --name "
        "eval-2 to keep both, or --overwrite to replace it")
    assert snapshot(ev) == before  # nothing sampled, nothing written

    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--temperature", "1.0",
                              "--name", "eval-2"])
    assert res.exit_code == 0, res.output
    assert snapshot(ev)["eval.jsonl"] == before["eval.jsonl"]
    assert [r["setting"] for r in eval_rows(ev / "eval-2.jsonl")] == ["T=1"]

    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--temperature", "1.0",
                              "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [r["setting"] for r in eval_rows(ev / "eval.jsonl")] == ["T=1"]
    assert len(eval_rows(ev / "eval-samples.jsonl")) == 2  # 2 prompts, its own samples


def test_orphan_samples_file_also_holds_the_name(tmp_path, run2):
    run = copy_run(run2, tmp_path / "run")
    (run / schema.EVAL_DIR).mkdir()
    (run / schema.EVAL_DIR / "eval-samples.jsonl").write_text('{"uid": 1}\n')
    before = snapshot(run)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK])
    assert res.exit_code == 2, res.output
    line = one_error_line(res)
    assert "eval-samples.jsonl: exists (1 row from" in line and "--name eval-2" in line
    assert snapshot(run) == before


def test_a_name_that_would_read_as_a_samples_file_is_refused(tmp_path, run2):
    run = copy_run(run2, tmp_path / "run")
    before = snapshot(run)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--name", "eval-samples"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith("error: --name 'eval-samples': must not end in")
    assert snapshot(run) == before


def test_results_that_appear_while_sampling_are_kept(tmp_path, run2, monkeypatch):
    """Another evaluation writes eval.jsonl while this one samples: this one's rows go to
    eval-2.jsonl and the other's file is untouched."""
    from hapo_cli import evaluate as ev_mod

    run = copy_run(run2, tmp_path / "run")
    inner = ev_mod._sample_models

    def racing(*args, **kwargs):
        out = inner(*args, **kwargs)
        (run / schema.EVAL_DIR).mkdir(exist_ok=True)
        (run / schema.EVAL_DIR / "eval.jsonl").write_text('{"other": 1}\n')
        return out

    monkeypatch.setattr(ev_mod, "_sample_models", racing)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK])
    assert res.exit_code == 0, res.output
    assert (run / schema.EVAL_DIR / "eval.jsonl").read_text() == '{"other": 1}\n'
    assert [r["setting"] for r in eval_rows(run / schema.EVAL_DIR / "eval-2.jsonl")] == ["T=0.5"]
    assert "these results are in" in res.output


# ---------------------------------------------------------------------------------------------
# smaller: Ctrl-C and SIGTERM during an evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_signal_during_sampling_says_what_was_kept(tmp_path, run2, monkeypatch, sig):
    from hapo_cli import evaluate as ev_mod

    run = copy_run(run2, tmp_path / "run")
    before = snapshot(run)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal interrupts this
        raise AssertionError(f"{sig!r} did not interrupt")

    monkeypatch.setattr(ev_mod, "_sample_models", interrupted)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK])
    assert res.exit_code == 130, res.output
    assert one_error_line(res) == (
        f"error: interrupted; nothing was written to {run / 'eval' / 'eval.jsonl'} (an "
        "evaluation does not resume): run the same command again to start it over")
    assert snapshot(run) == before
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---------------------------------------------------------------------------------------------
# 14. checkpoints that a live run rotates away while they are evaluated
# ---------------------------------------------------------------------------------------------


def _rotate_after_listing(monkeypatch, remove, add=None):
    """The learner's rotation right after `hapo evaluate` lists the checkpoints (first listing
    only): `remove` folders go, an `add` (src, dst) folder appears."""
    import hapo_cli.learner.checkpoint as ckpt

    real, calls = ckpt.list_checkpoints, []

    def listing(run_dir):
        out = real(run_dir)
        if not calls:
            if add:
                shutil.copytree(*add)
            for d in remove:
                shutil.rmtree(d)
        calls.append(1)
        return out

    monkeypatch.setattr(ckpt, "list_checkpoints", listing)
    return calls


def test_checkpoint_removed_after_listing_is_skipped(tmp_path, run2, monkeypatch):
    run = copy_run(run2, tmp_path / "run")
    _rotate_after_listing(monkeypatch, [run / schema.checkpoint_dir(1)])
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "all"])
    assert res.exit_code == 0, res.output
    assert lines_starting(res, "skipped") == [
        "skipped step-000001: removed after it was listed (the run rotates its checkpoints)"]
    assert [r["checkpoint_step"] for r in eval_rows(run / "eval" / "eval.jsonl")] == [2]


def test_all_listed_checkpoints_removed_lists_again(tmp_path, run2, monkeypatch):
    """`--checkpoints all` means what is there: when rotation took every listed one (a live
    run at seconds per step), the checkpoints written meanwhile are evaluated."""
    run = copy_run(run2, tmp_path / "run")
    c1, c2 = run / schema.checkpoint_dir(1), run / schema.checkpoint_dir(2)
    calls = _rotate_after_listing(monkeypatch, [c1, c2],
                                  add=(c2, run / schema.checkpoint_dir(3)))
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "all"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 2
    assert [x.split(":")[0] for x in lines_starting(res, "skipped")] == [
        "skipped step-000001", "skipped step-000002"]
    assert [r["checkpoint_step"] for r in eval_rows(run / "eval" / "eval.jsonl")] == [3]


def test_checkpoint_removed_while_evaluating_is_skipped(tmp_path, run2, monkeypatch):
    from hapo_cli import evaluate as ev_mod

    run = copy_run(run2, tmp_path / "run")
    real = ev_mod.sample_benchmark

    def rotating(*args, **kwargs):
        shutil.rmtree(run / schema.checkpoint_dir(2), ignore_errors=True)  # while step 1 samples
        return real(*args, **kwargs)

    monkeypatch.setattr(ev_mod, "sample_benchmark", rotating)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "all"])
    assert res.exit_code == 0, res.output
    assert lines_starting(res, "skipped") == [
        "skipped step-000002: removed after it was checked (the run rotates its checkpoints)"]
    assert [r["checkpoint_step"] for r in eval_rows(run / "eval" / "eval.jsonl")] == [1]


def test_live_run_checkpoint_half_removed_is_waited_for(tmp_path, run2):
    """rmtree of a rotating checkpoint: config.json is already gone, the folder goes a moment
    later. In a live run (manifest `running`) that is a vanishing checkpoint, not an error."""
    run = copy_run(run2, tmp_path / "run")
    manifest = json.loads((run / schema.MANIFEST).read_text())
    (run / schema.MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))
    ckpt = run / schema.checkpoint_dir(1)
    (ckpt / "config.json").unlink()
    remover = threading.Timer(0.5, shutil.rmtree, [ckpt])
    remover.start()
    try:
        res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "all"])
    finally:
        remover.join()
    assert res.exit_code == 0, res.output
    assert lines_starting(res, "skipped")[0].startswith("skipped step-000001: removed after")
    assert [r["checkpoint_step"] for r in eval_rows(run / "eval" / "eval.jsonl")] == [2]


def test_broken_checkpoint_of_a_finished_run_is_still_an_error(tmp_path, run2):
    run = copy_run(run2, tmp_path / "run")
    (run / schema.checkpoint_dir(1) / "config.json").unlink()
    before = snapshot(run)
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "all"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == (
        f"error: {run / schema.checkpoint_dir(1)}: no config.json (not an HF model directory)")
    assert snapshot(run) == before


def test_every_checkpoint_removed_is_one_line(tmp_path, run2, monkeypatch):
    run = copy_run(run2, tmp_path / "run")
    _rotate_after_listing(monkeypatch, [run / schema.checkpoint_dir(1),
                                        run / schema.checkpoint_dir(2)])
    res = runner.invoke(app, ["evaluate", str(run), *QUICK, "--checkpoints", "1,2"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == (
        f"error: {run}: every checkpoint asked for was removed before it was read (a live run "
        "rotates them faster than they are checked); try --checkpoints latest")
    assert not (run / schema.EVAL_DIR).exists()


# ---------------------------------------------------------------------------------------------
# 2. runs are averaged only when they are seeds of one recipe
# ---------------------------------------------------------------------------------------------


def _set_recipe(run: Path, **changes) -> None:
    """Change dotted keys of a run's recipe.yaml: _set_recipe(run, **{"train.max_steps": 3})."""
    rec = yaml.safe_load((run / schema.RECIPE).read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        d = rec
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    (run / schema.RECIPE).write_text(yaml.safe_dump(rec))


def _final_table(report: Path) -> list[str]:
    """The rows of the report's 'Final values per label' table."""
    text = report.read_text()
    block = text.split("## Final values per label")[1].split("\n## ")[0]
    return [x for x in block.splitlines() if x.startswith("| ") and "---" not in x][1:]


def test_two_runs_sharing_a_folder_name_are_not_two_seeds(tmp_path):
    for g, lr in (("g1", 1e-6), ("g2", 1e-3)):
        write_run(tmp_path / g / "run", seed=1, token_steps=())
        _set_recipe(tmp_path / g / "run", **{"train.lr": lr})
    before = snapshot(tmp_path)
    res = runner.invoke(app, ["analyze", str(tmp_path / "g1" / "run"),
                              str(tmp_path / "g2" / "run"), "--format", "png"])
    assert res.exit_code == 0, res.output
    notes = [x for x in lines_starting(res, "warning:") if "kept apart" in x]
    assert notes == ["warning: label 'run': run vs g2/run kept apart as run (lr=1e-06), run "
                     "(lr=0.001): their recipes differ (train.lr: 1e-06 vs 0.001)"]
    rows = _final_table(tmp_path / "analysis" / "report.md")
    assert [r.split(" | ")[0:2] for r in rows] == [["| run (lr=1e-06)", "1"],
                                                   ["| run (lr=0.001)", "1"]]
    assert all("n=1" in r for r in rows)  # one seed each: no interval
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("analysis")} == before


def test_ablation_runs_of_different_budgets_passed_as_runs_are_kept_apart(tmp_path):
    for grid, steps in (("k1", 40), ("v1", 3)):
        run = tmp_path / "abl" / grid / "none-s1"
        write_run(run, seed=1, steps=steps, token_steps=())
        _set_recipe(run, **{"train.max_steps": steps})
    coll = load_paths([tmp_path / "abl" / "k1" / "none-s1", tmp_path / "abl" / "v1" / "none-s1"])
    assert [r.label for r in coll.runs] == ["none (max_steps=40)", "none (max_steps=3)"]
    assert [w for w in coll.warnings if "kept apart" in w] == [
        "label 'none': none-s1 vs v1/none-s1 kept apart as none (max_steps=40), none "
        "(max_steps=3): their recipes differ (train.max_steps: 40 vs 3)"]


def test_same_recipe_same_seed_is_a_repeat_not_a_second_seed(tmp_path):
    write_run(tmp_path / "a" / "run", seed=1, token_steps=())
    write_run(tmp_path / "b" / "run", seed=1, token_steps=())
    write_run(tmp_path / "c" / "run-s2", seed=2, token_steps=())
    coll = load_paths([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c" / "run-s2"])
    # run-s2 (seed 2) is a seed of a/run's recipe; b/run repeats seed 1
    assert [r.label for r in coll.runs] == ["run #1", "run #2", "run #1"]
    assert [w for w in coll.warnings if "kept apart" in w] == [
        "label 'run': run, run-s2 vs b/run kept apart as run #1, run #2: the same recipe run "
        "twice with seed 1, 2 (repeats, not seeds)"]


def test_seeds_of_one_recipe_still_average(tmp_path):
    """The control: different seeds, recipes equal but for the seed, its thread count and
    where it logs: one label, two seeds."""
    write_run(tmp_path / "hapo-s1", seed=1, token_steps=())
    write_run(tmp_path / "hapo-s2", seed=2, token_steps=())
    _set_recipe(tmp_path / "hapo-s2", **{"train.threads": 4, "log.run_name": "x"})
    coll = load_paths([tmp_path])
    assert [r.label for r in coll.runs] == ["hapo", "hapo"]
    assert not [w for w in coll.warnings if "kept apart" in w]


# ---------------------------------------------------------------------------------------------
# 3. the ablation summary states the step it compares and flags unequal budgets
# ---------------------------------------------------------------------------------------------


def _grid(path: Path, none_steps: int) -> Path:
    """A 2-step grid (none, AB; seed 1) whose `none` was then extended to `none_steps`."""
    write_ablation(path, {"none": 0.0, "AB": 0.05}, seeds=(1,), steps=2, token_steps=())
    write_run(path / "none-s1", seed=1, steps=none_steps, components="none", token_steps=())
    return path


def test_summary_of_equal_budgets_states_the_step(tmp_path):
    abl = _grid(tmp_path / "abl", 2)
    res = runner.invoke(app, ["ablate", "--summary", str(abl)])
    assert res.exit_code == 0, res.output
    assert "Compared at step 2 (the last logged step of every run)." in res.output
    md = (abl / "summary.md").read_text()
    assert md.splitlines()[2] == "Compared at step 2 (the last logged step of every run)."
    df = pd.read_csv(abl / "summary.csv", index_col="variant")
    # final val/toy/avg@4 at step 2 = 0.1 + 0.02 + 0.02 + offset: AB - none = +0.05
    assert df.at["AB", "toy/avg@4/final_pair_delta"] == pytest.approx(0.05)


def test_summary_of_unequal_budgets_flags_them_and_pairs_nothing(tmp_path):
    abl = _grid(tmp_path / "abl", 3)
    res = runner.invoke(app, ["ablate", "--summary", str(abl)])
    assert res.exit_code == 0, res.output
    warning = ("Unequal budgets, not compared at one step: AB at step 2; none at step 3. Δ pairs "
               "only seeds at the same step (none: —); rerun the shorter runs with the same "
               "--max-steps.")
    assert lines_starting(res, "warning:") == [f"warning: {warning}"]
    md = (abl / "summary.md").read_text()
    assert md.splitlines()[2] == f"**Warning: {warning}**"
    assert "| variant | seeds | status | step |" in md
    df = pd.read_csv(abl / "summary.csv", index_col="variant")
    assert df["steps"].astype(str).tolist() == ["3", "2"]
    assert df.at["AB", "toy/avg@4/final_pair_n"] == 0  # step 2 is never paired with step 3
    assert pd.isna(df.at["AB", "toy/avg@4/final_pair_delta"])
    assert pd.isna(df.at["AB", "toy/avg@4/delta_final"])
    # the analysis report says the same
    res = runner.invoke(app, ["analyze", str(abl), "--format", "png"])
    assert res.exit_code == 0, res.output
    assert f"warning: abl: {warning}" in lines_starting(res, "warning:")
    assert f"Warning: {warning}" in (abl / "analysis" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# smaller: --summary of a live ablation only reads
# ---------------------------------------------------------------------------------------------


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the ablation's lock, as a live `hapo ablate` does."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_summary_of_a_live_ablation_writes_nothing(tmp_path):
    from hapo_cli.ablate import LOCK_FILE

    abl = _grid(tmp_path / "abl", 2)
    (abl / "summary.md").write_text("the summary the ablation wrote\n")
    (abl / LOCK_FILE).touch()  # the ablation created it
    before = snapshot(abl)
    holder = _hold_lock(abl / LOCK_FILE)
    try:
        res = runner.invoke(app, ["ablate", "--summary", str(abl)])
    finally:
        holder.kill()
        holder.wait()
    assert res.exit_code == 0, res.output
    assert (f"{abl}: the ablation is still running (its lock is held): summary.csv and "
            "summary.md not written; they are when it ends") in res.output
    assert "Compared at step 2" in res.output and "AB" in res.output  # still printed
    assert snapshot(abl) == before
    # the lock released: the same command writes them
    res = runner.invoke(app, ["ablate", "--summary", str(abl)])
    assert res.exit_code == 0, res.output
    assert (abl / "summary.csv").is_file()
    assert (abl / "summary.md").read_text().startswith("# Ablation summary: abl")


def test_the_ablations_own_summary_under_its_lock_is_written(tmp_path):
    """`hapo ablate` prints its summary at the end while it holds the lock itself."""
    from hapo_cli.ablate import show_summary
    from hapo_cli.ablate.plan import take_lock

    abl = _grid(tmp_path / "abl", 2)
    fd = take_lock(abl)
    try:
        show_summary(abl)
    finally:
        os.close(fd)
    assert (abl / "summary.csv").is_file() and (abl / "summary.md").is_file()


# ---------------------------------------------------------------------------------------------
# smaller: analyze counts and warnings
# ---------------------------------------------------------------------------------------------


def _runs_row(report: Path) -> dict[str, str]:
    text = report.read_text().split("## Runs")[1]
    table = [x for x in text.splitlines() if x.startswith("| ")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    return dict(zip(head, cells, strict=True))


def test_eval_rows_count_results_not_samples(tmp_path):
    rows = [{"benchmark": "toy", "setting": s, "checkpoint_step": 6, "n": 4, "avg@4": 0.5}
            for s in ("T=0.5", "adaptive")]
    run = tmp_path / "run"
    write_run(run, token_steps=(), evals=rows)  # eval/sweep.jsonl: 2 result rows
    (run / "eval" / "sweep-samples.jsonl").write_text(
        "".join(json.dumps({"benchmark": "toy", "uid": i}) + "\n" for i in range(48)))
    res = runner.invoke(app, ["analyze", str(run), "--format", "png"])
    assert res.exit_code == 0, res.output
    assert _runs_row(run / "analysis" / "report.md")["eval rows"] == "2"
    assert load_run(run).evals["source"].tolist() == ["sweep", "sweep"]


def test_unreadable_manifest_is_one_warning(tmp_path):
    run = tmp_path / "run"
    write_run(run, token_steps=())
    (run / schema.MANIFEST).write_text('{"status": "do')
    res = runner.invoke(app, ["analyze", str(run), "--format", "png"])
    assert res.exit_code == 0, res.output
    assert lines_starting(res, "warning:") == [
        f"warning: {run / schema.MANIFEST}: unreadable (not a JSON object); status shown as "
        "unknown"]
    assert _runs_row(run / "analysis" / "report.md")["status"] == "unknown"


def test_token_file_of_another_schema_is_skipped_with_one_warning(tmp_path):
    run = tmp_path / "run"
    write_run(run, token_steps=(1,))
    good = len(pd.read_parquet(run / schema.tokens_file(1)))
    pd.DataFrame({"step": [3], "loss": [0.5]}).to_parquet(run / schema.tokens_file(3))
    res = runner.invoke(app, ["analyze", str(run), "--format", "png"])
    assert res.exit_code == 0, res.output
    assert lines_starting(res, "warning:") == [
        f"warning: {run / schema.tokens_file(3)}: not a token sample (no column sample, "
        "position, token_id and 12 more); skipped"]
    tokens = load_run(run).tokens
    assert len(tokens) == good and "loss" not in tokens.columns
    assert _runs_row(run / "analysis" / "report.md")["token rows"] == str(good)


def test_fcntl_probe_leaves_the_lock_free(tmp_path):
    """Reading a summary must not leave the directory locked for the next `hapo ablate`."""
    from hapo_cli.ablate import show_summary
    from hapo_cli.ablate.plan import LOCK_FILE

    abl = _grid(tmp_path / "abl", 2)
    (abl / LOCK_FILE).touch()
    show_summary(abl)
    fd = os.open(abl / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
    finally:
        os.close(fd)
