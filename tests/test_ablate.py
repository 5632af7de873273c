"""`hapo ablate`: grid expansion, ablation.json, resume semantics on a fake runner, SIGKILL.

The fake trainer below mimics `hapo train --resume` on the run-directory format (manifest
status, metrics.jsonl rows, checkpoints/step-NNNNNN with trainer_state.json, metrics truncated
to the checkpoint on resume). It runs in-process (`FakeRunner`) or as a child process
(`python tests/test_ablate.py fake-train ...`) for the SIGKILL test.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hapo_cli.ablate import (
    DONE,
    FAILED,
    INTERRUPTED,
    LOCK_FILE,
    AblationSpec,
    PlanEntry,
    RunState,
    Variant,
    build_plan,
    decide,
    expand_variants,
    grid_variants,
    latest_checkpoint_step,
    merge_plan,
    parse_seeds,
    parse_variants,
    read_ablation,
    run_ablation,
    slot_resources,
    write_ablation,
)
from hapo_cli.errors import HapoError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# ---------------------------------------------------------------------------------------------
# grid expansion
# ---------------------------------------------------------------------------------------------


def test_grid_paper_abcd():
    # baseline, 4 singles, 4 leave-one-out (size 3, canonical order), all: 10 variants
    assert grid_variants("ABCD", "paper") == [
        "none", "A", "B", "C", "D", "ABC", "ABD", "ACD", "BCD", "ABCD",
    ]  # fmt: skip


def test_grid_single_and_leave_one_out():
    assert grid_variants("ABCD", "single") == ["none", "A", "B", "C", "D"]
    assert grid_variants("ABCD", "leave-one-out") == ["none", "ABC", "ABD", "ACD", "BCD", "ABCD"]


def test_grid_all_is_every_subset():
    got = grid_variants("ABCD", "all")
    assert len(got) == 16  # 2^4
    assert got[:5] == ["none", "A", "B", "C", "D"]
    assert got[5:11] == ["AB", "AC", "AD", "BC", "BD", "CD"]  # C(4,2) = 6
    assert got[11:] == ["ABC", "ABD", "ACD", "BCD", "ABCD"]


def test_grid_restricted_letters_dedupes():
    # over AB, singles and leave-one-out coincide (A, B): none, A, B, AB once each
    assert grid_variants("AB", "paper") == ["none", "A", "B", "AB"]
    assert grid_variants("AB", "leave-one-out") == ["none", "A", "B", "AB"]
    assert grid_variants("BD", "all") == ["none", "B", "D", "BD"]
    # one letter: leave-one-out of C is the baseline
    assert grid_variants("C", "paper") == ["none", "C"]


def test_grid_unknown_mode():
    with pytest.raises(HapoError, match="--grid 'paperz' is not one of"):
        grid_variants("ABCD", "paperz")


def test_explicit_variants_canonical_baseline_first_no_duplicates():
    assert parse_variants("none,B,AB,ABCD", "ABCD") == ["none", "B", "AB", "ABCD"]
    # 'ba' -> 'AB' (canonical), duplicate 'AB' dropped, baseline moved first, order kept
    assert parse_variants("ba,D,AB,none", "ABCD") == ["none", "AB", "D"]
    assert parse_variants("b", "AB") == ["B"]


@pytest.mark.parametrize(
    "spec, letters, message",
    [
        ("AC", "AB", "uses C, which is not in --components AB"),
        ("AX", "ABCD", "'AX' is not a variant"),
        ("A,,B", "ABCD", "empty entry"),
        ("", "ABCD", "expected a comma list"),
        ("AA", "ABCD", "'AA' is not a variant"),
    ],
)
def test_explicit_variants_errors(spec, letters, message):
    with pytest.raises(HapoError, match=message):
        parse_variants(spec, letters)


def test_expand_variants_components_and_released():
    got = expand_variants("ab", "paper", None, compare_released=True)
    assert [v.name for v in got] == ["none", "A", "B", "AB", "AB-released"]
    assert got[-1] == Variant("AB-released", "AB", ("algo.entropy_norm=released",))
    assert got[0] == Variant("none", "none", ())
    # --variants overrides --grid
    assert [v.name for v in expand_variants("ABCD", "all", "ABCD,none")] == ["none", "ABCD"]


@pytest.mark.parametrize("components", ["none", "", "ABE", "AAB"])
def test_expand_variants_bad_components(components):
    with pytest.raises(HapoError):
        expand_variants(components)


def test_parse_seeds():
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds(" 3, 1,3") == [3, 1]
    assert parse_seeds([2, 2, 0]) == [2, 0]
    assert parse_seeds(str(2**32 - 1)) == [2**32 - 1]
    for bad, msg in (("1,x", "'x' is not an integer"), ("-1", r"must be in 0\.\.4294967295"),
                     ("4294967296", r"must be in 0\.\.4294967295, got 4294967296"),
                     ("", "'' is not an integer")):
        with pytest.raises(HapoError, match=msg):
            parse_seeds(bad)


def test_build_plan_is_seed_major():
    plan = build_plan(expand_variants("A", compare_released=True), [1, 2])
    assert [e.run_dir for e in plan] == [
        "none-s1", "A-s1", "A-released-s1", "none-s2", "A-s2", "A-released-s2",
    ]  # fmt: skip
    assert plan[2] == PlanEntry("A-released", 1, "A-released-s1", "A",
                                ("algo.entropy_norm=released",))


def test_slot_resources():
    assert slot_resources(2, 2, []) == [(1, None), (1, None)]  # 2 // 2 = 1 thread each
    assert slot_resources(3, 2, []) == [(1, None)] * 3  # max(1, 2 // 3 = 0)
    assert slot_resources(1, 16, ["0"]) == [(16, None)]  # one GPU: left as it is
    # 16 // 3 = 5 threads; GPUs round robin
    assert slot_resources(3, 16, ["0", "1"]) == [(5, "0"), (5, "1"), (5, "0")]
    with pytest.raises(HapoError, match="--workers must be >= 1, got 0"):
        slot_resources(0, 2, [])


# ---------------------------------------------------------------------------------------------
# decisions and ablation.json
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest, recorded, retry, expected",
    [
        ({"status": "done", "final_step": 4}, "running", False, DONE),
        ({"status": "done"}, "planned", False, DONE),  # no final_step: trust the status
        ({"status": "done", "final_step": 2}, "done", False, "run"),  # --max-steps 4 extends
        ({"status": "running"}, "running", False, "run"),  # killed: resume
        ({"status": "running"}, "failed", False, FAILED),  # crashed (manifest never updated)
        ({"status": "running"}, "failed", True, "run"),
        ({"status": "failed"}, "running", False, FAILED),
        ({"status": "failed"}, "failed", True, "run"),
        ({}, "planned", False, "run"),
        ({}, "interrupted", False, "run"),
    ],
)
def test_decide(manifest, recorded, retry, expected):
    assert decide(manifest, RunState(status=recorded), max_steps=4, retry_failed=retry) == expected


def test_ablation_json_round_trip(tmp_path):
    plan = build_plan(expand_variants("AB", compare_released=True), [1])
    spec = AblationSpec("abl", "tiny/hapo", "abc123", ["train.lr=1e-4"], plan)
    spec.state("A-s1").status = FAILED
    spec.state("A-s1").error = "ValueError: boom"
    write_ablation(tmp_path, spec)
    assert [p.name for p in tmp_path.iterdir()] == ["ablation.json"]  # no temporary left
    back = read_ablation(tmp_path)
    assert back.to_json() == spec.to_json()
    raw = json.loads((tmp_path / "ablation.json").read_text())
    # the keys analysis.io.load_ablation reads
    assert raw["name"] == "abl"
    assert raw["plan"][4] == {"variant": "AB-released", "seed": 1, "run_dir": "AB-released-s1",
                              "components": "AB", "overrides": ["algo.entropy_norm=released"]}
    assert raw["runs"]["A-s1"]["status"] == "failed"


def test_read_ablation_missing_and_corrupt(tmp_path):
    assert read_ablation(tmp_path) is None
    (tmp_path / "ablation.json").write_text("{not json")
    with pytest.raises(HapoError, match="not a readable ablation spec"):
        read_ablation(tmp_path)


def test_merge_plan_grows_and_refuses_other_recipe():
    old = AblationSpec("x", "r", "h1", [], build_plan(expand_variants("A"), [1]))
    old.state("none-s1").status = DONE
    new = AblationSpec("x", "r", "h1", [], build_plan(expand_variants("A"), [1, 2]))
    merged = merge_plan(old, new)
    assert [e.run_dir for e in merged.plan] == ["none-s1", "A-s1", "none-s2", "A-s2"]
    assert merged.runs["none-s1"].status == DONE  # records kept
    other = AblationSpec("x", "r", "h2", ["train.lr=1"], new.plan)
    with pytest.raises(HapoError, match="planned with another recipe"):
        merge_plan(merged, other)


# ---------------------------------------------------------------------------------------------
# the fake trainer (same run-directory behaviour as `hapo train --resume`)
# ---------------------------------------------------------------------------------------------


def fake_val(components: str, seed: int, step: int) -> float:
    """Validation accuracy the fake trainer logs: 0.1 per letter + 0.01 * seed + step / 100."""
    n = 0 if components == "none" else len(components)
    return round(0.1 * n + 0.01 * seed + step / 100, 6)


def _letters(algo: dict) -> str:
    keys = ("adaptive_temperature", "token_level_advantage", "redistribute", "adaptive_clip")
    return "".join(c for c, k in zip("ABCD", keys, strict=True) if algo.get(k)) or "none"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def fake_train(recipe_path: Path, run_dir: Path, *, step_s: float = 0.0,
               fail: bool = False, calls: Path | None = None) -> int:
    """Mimic `hapo train --recipe R --output D --resume`; returns the exit code."""
    rec = yaml.safe_load(Path(recipe_path).read_text())
    max_steps = rec["train"]["max_steps"]
    every = rec["log"]["checkpoint_every"] or max_steps
    seed, comps = rec["seed"], _letters(rec["algo"])
    run_dir.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint_step(run_dir) or 0
    metrics = run_dir / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if metrics.exists() else []
    kept = [r for r in rows if json.loads(r)["step"] <= start]
    metrics.write_text("".join(r + "\n" for r in kept))
    if calls is not None:
        with open(calls, "a") as f:
            f.write(f"{run_dir.name} {start}\n")
    (run_dir / "recipe.yaml").write_text(Path(recipe_path).read_text())
    manifest = {"status": "running", "seed": seed, "run_name": run_dir.name,
                "components": comps}
    _write_json(run_dir / "manifest.json", manifest)
    print(f"fake train {run_dir.name} from step {start}", flush=True)
    if fail:
        print(f"ValueError: fake failure of {comps}", file=sys.stderr, flush=True)
        return 1
    for step in range(start + 1, max_steps + 1):
        time.sleep(step_s)
        row = {"step": step, "actor/entropy_mean": 1.0 - step / 100,
               "rollout/response_len_mean": 10.0 + seed,
               "val/arith/avg@4": fake_val(comps, seed, step)}
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if step % every == 0 or step == max_steps:
            ck = run_dir / "checkpoints" / f"step-{step:06d}"
            tmp = ck.with_name(f".{ck.name}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
            os.replace(tmp, ck)
    _write_json(run_dir / "manifest.json", {**manifest, "status": "done",
                                            "final_step": max_steps})
    return 0


class FakeHandle:
    def __init__(self, rc: int) -> None:
        self.rc, self.polls = rc, 0

    def poll(self):
        self.polls += 1
        return self.rc if self.polls > 1 else None  # running for one poll

    def terminate(self):
        pass


class FakeRunner:
    """In-process: runs the fake trainer at start; records (run, start step, threads env)."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.fail = set(fail)
        self.calls: list[tuple[str, int]] = []
        self.jobs = []

    def start(self, job):
        self.jobs.append(job)
        self.calls.append((job.name, latest_checkpoint_step(job.run_dir) or 0))
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        err = io.StringIO()
        old = sys.stderr
        sys.stderr = err
        try:
            rc = fake_train(job.recipe_path, job.run_dir, fail=job.variant in self.fail)
        finally:
            sys.stderr = old
        job.log_path.write_text("loading...\n" + err.getvalue() + "\n")
        return FakeHandle(rc)


@pytest.fixture
def fake_recipe(tmp_path):
    """A small recipe whose policy needs no warm-up (a 'pretrained' local dir)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = {
        "name": "fake", "seed": 1,
        "model": {"init": "pretrained", "path": str(model)},
        "train": {"max_steps": 4, "threads": 7},
        "eval": {"every": 2},
        "log": {"checkpoint_every": 2},
    }  # fmt: skip
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def _ablate(recipe, out, runner, **kw):
    args = dict(recipe=str(recipe), components="AB", grid="paper", seeds="1", output=out,
                console=_console(), runner=runner, poll_interval=0.0)
    args.update(kw)
    return run_ablation(**args)


def _statuses(out: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((out / "ablation.json").read_text())["runs"].items()}


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# run_ablation on the fake runner
# ---------------------------------------------------------------------------------------------


def test_runs_every_variant_and_writes_plan_recipes(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    runner = FakeRunner()
    assert _ablate(fake_recipe, out, runner, seeds="1,2", workers=2) is True
    names = ["none-s1", "A-s1", "B-s1", "AB-s1", "none-s2", "A-s2", "B-s2", "AB-s2"]
    assert [c for c, _ in runner.calls] == names  # plan order, each once, from step 0
    assert all(start == 0 for _, start in runner.calls)
    assert _statuses(out) == dict.fromkeys(names, "done")
    # the resolved recipe of a run: its switches and seed; threads = the worker's fair share
    rec = yaml.safe_load((out / ".plans" / "B-s2.yaml").read_text())
    assert rec["seed"] == 2
    assert rec["algo"]["token_level_advantage"] is True
    assert rec["algo"]["adaptive_temperature"] is False
    cores = len(os.sched_getaffinity(0))
    assert rec["train"]["threads"] == max(1, cores // 2)
    assert runner.jobs[0].env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert _steps(out / "AB-s1") == [1, 2, 3, 4]
    # summary written: variant AB seed mean of the final val (step 4):
    # seed 1: 0.2 + 0.01 + 0.04 = 0.25; seed 2: 0.2 + 0.02 + 0.04 = 0.26 -> mean 0.255
    import pandas as pd

    df = pd.read_csv(out / "summary.csv", index_col="variant")
    assert list(df.index) == ["none", "A", "B", "AB"]
    assert df.at["AB", "arith/avg@4/final_mean"] == pytest.approx(0.255)
    # delta vs none (0.0 + 0.015 + 0.04 = 0.055): 0.255 - 0.055 = 0.2
    assert df.at["AB", "arith/avg@4/delta_final"] == pytest.approx(0.2)
    assert (out / "summary.md").is_file()


def test_user_threads_override_is_kept(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none", overrides=["train.threads=3"])
    assert yaml.safe_load((out / ".plans/none-s1.yaml").read_text())["train"]["threads"] == 3


def test_resume_semantics(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    runner = FakeRunner(fail={"B"})
    assert _ablate(fake_recipe, out, runner) is False  # B failed, the others went on
    spec = read_ablation(out)
    assert _statuses(out) == {"none-s1": "done", "A-s1": "done", "B-s1": "failed",
                              "AB-s1": "done"}
    assert spec.runs["B-s1"].error == "ValueError: fake failure of B"  # last line of its log
    assert spec.runs["B-s1"].rc == 1

    # Simulate a kill of AB-s1 after its checkpoint at step 2: manifest still 'running',
    # metrics past the checkpoint (step 3 logged, never checkpointed), ablation.json 'running'.
    ab = out / "AB-s1"
    for step in (4,):
        import shutil

        shutil.rmtree(ab / "checkpoints" / f"step-{step:06d}")
    _write_json(ab / "manifest.json", {"status": "running", "seed": 1})
    lines = (ab / "metrics.jsonl").read_text().splitlines()[:3]
    (ab / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    spec.runs["AB-s1"].status = "running"
    write_ablation(out, spec)

    runner2 = FakeRunner()
    assert _ablate(fake_recipe, out, runner2) is False  # B still failed
    assert runner2.calls == [("AB-s1", 2)]  # finished skipped, failed kept, AB resumed at 2
    assert _statuses(out)["B-s1"] == "failed"
    assert _statuses(out)["AB-s1"] == "done"
    assert _steps(ab) == [1, 2, 3, 4]  # contiguous, nothing repeated

    runner3 = FakeRunner()
    assert _ablate(fake_recipe, out, runner3, retry_failed=True) is True
    assert runner3.calls == [("B-s1", 0)]  # B had no checkpoint: starts again
    assert set(_statuses(out).values()) == {"done"}
    assert read_ablation(out).runs["B-s1"].attempts == 2


def test_plan_grows_and_max_steps_extends(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none,A")
    runner = FakeRunner()
    # a second seed and a larger --max-steps: seed 2 runs, seed 1 runs are extended from 4
    assert _ablate(fake_recipe, out, runner, variants="none,A", seeds="1,2", max_steps=6)
    assert runner.calls == [("none-s1", 4), ("A-s1", 4), ("none-s2", 0), ("A-s2", 0)]
    assert [e.run_dir for e in read_ablation(out).plan] == ["none-s1", "A-s1", "none-s2", "A-s2"]
    assert _steps(out / "A-s1") == [1, 2, 3, 4, 5, 6]


def test_different_recipe_is_refused_untouched(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none")
    before = (out / "ablation.json").read_bytes()
    runner = FakeRunner()
    with pytest.raises(HapoError, match="planned with another recipe"):
        _ablate(fake_recipe, out, runner, variants="none", overrides=["train.lr=0.5"])
    assert runner.calls == []
    assert (out / "ablation.json").read_bytes() == before


def test_switch_overrides_are_refused(tmp_path, fake_recipe):
    with pytest.raises(HapoError, match="sets the component switches itself"):
        _ablate(fake_recipe, tmp_path / "abl", FakeRunner(), overrides=["algo.redistribute=true"])
    assert not (tmp_path / "abl").exists()  # nothing written


def test_bad_override_fails_before_writing(tmp_path, fake_recipe):
    from hapo_cli.recipe import RecipeError

    with pytest.raises(RecipeError, match="train.lrr"):
        _ablate(fake_recipe, tmp_path / "abl", FakeRunner(), overrides=["train.lrr=1"])
    assert not (tmp_path / "abl").exists()


def test_locked_directory_is_refused(tmp_path, fake_recipe):
    import fcntl

    out = tmp_path / "abl"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(HapoError, match="in use by another"):
            _ablate(fake_recipe, out, FakeRunner())


def test_interrupt_marks_active_runs_interrupted(tmp_path, fake_recipe):
    class Interrupting(FakeRunner):
        def start(self, job):
            if job.name == "A-s1":
                raise KeyboardInterrupt
            return super().start(job)

    out = tmp_path / "abl"
    with pytest.raises(KeyboardInterrupt):
        _ablate(fake_recipe, out, Interrupting(), variants="none,A,B", workers=1)
    st = _statuses(out)
    assert st["none-s1"] == "done"
    assert st["A-s1"] == INTERRUPTED  # resumed next time
    assert st["B-s1"] == "planned"
    runner = FakeRunner()
    assert _ablate(fake_recipe, out, runner, variants="none,A,B")
    assert runner.calls == [("A-s1", 0), ("B-s1", 0)]


def test_live_table_on_a_terminal(tmp_path, fake_recipe):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    assert _ablate(fake_recipe, tmp_path / "abl", FakeRunner(), variants="none,A", console=console)
    text = buf.getvalue()
    assert "ablation abl: 2/2 finished" in text  # the live table's last frame
    assert "val avg@k" in text and "4/4" in text


def test_default_output_dir_from_recipe_name(tmp_path, fake_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_ablation(recipe=str(fake_recipe), variants="none", console=_console(),
                 runner=FakeRunner(), poll_interval=0.0, components="A")
    assert (tmp_path / "results" / "fake-ablation" / "ablation.json").is_file()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_bad_inputs_exit_2(tmp_path):
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["ablate", "--grid", "bogus", "--output", str(tmp_path / "a")])
    assert res.exit_code == 2
    assert "--grid 'bogus' is not one of" in res.output
    res = cli.invoke(app, ["ablate", "--seeds", "1,x", "--output", str(tmp_path / "a")])
    assert res.exit_code == 2 and "'x' is not an integer" in res.output
    res = cli.invoke(app, ["ablate", "--summary", str(tmp_path)])
    assert res.exit_code == 2 and "not an ablation directory" in res.output
    assert not (tmp_path / "a").exists()


def test_cli_summary(tmp_path, fake_recipe, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    from hapo_cli import cli
    from hapo_cli.cli import app

    monkeypatch.setattr(cli, "console", Console(width=200))  # the table on one line per row

    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none,B", seeds="1,2", summary=False)
    assert not (out / "summary.csv").exists()
    res = CliRunner().invoke(app, ["ablate", "--summary", str(out)])
    assert res.exit_code == 0, res.output
    # none final: 0 + 0.01|0.02 + 0.04 = 0.05|0.06 -> 0.055 ± 0.007 (sample std 0.00707)
    assert "0.055 ± 0.007" in res.output
    # B: 0.155 ± 0.007, delta +0.100
    assert "0.155 ± 0.007" in res.output and "+0.100" in res.output
    assert (out / "summary.csv").is_file() and (out / "summary.md").is_file()


def test_cli_summary_pairs_each_baseline_with_its_none(tmp_path, fake_recipe, monkeypatch):
    """`--baselines dapo,grpo --variants none,B`: one summary, each B paired with its own
    baseline's none (analysis.summary.baseline_pairs; the statistics: test_analysis_report)."""
    from rich.console import Console
    from typer.testing import CliRunner

    from hapo_cli import cli
    from hapo_cli.cli import app

    monkeypatch.setattr(cli, "console", Console(width=250))
    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none,B", seeds="1,2", summary=False,
            baselines="dapo,grpo")
    res = CliRunner().invoke(app, ["ablate", "--summary", str(out)])
    assert res.exit_code == 0, res.output
    rows: dict[str, str] = {}  # variant -> its lines of every table (one per metric)
    for ln in res.output.splitlines():
        cell = ln.split("│")[1].strip() if ln.count("│") > 3 else ""
        if cell.startswith(("dapo", "grpo")):
            rows[cell] = rows.get(cell, "") + ln
    assert sorted(rows) == ["dapo-B", "dapo-none", "grpo-B", "grpo-none"]
    for b in ("dapo", "grpo"):  # the fake trainer's B is +0.100 on any baseline
        assert f"{b}-none" in rows[f"{b}-B"] and "+0.100" in rows[f"{b}-B"]
        assert "baseline" in rows[f"{b}-none"]
    assert "column vs: `dapo-none`, `grpo-none`" in (out / "summary.md").read_text()


def test_python_m_cli_entry_point():
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", "ablate", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "--compare-released" in res.stdout


# ---------------------------------------------------------------------------------------------
# SIGKILL of the whole ablation (parent + children) with a subprocess fake trainer
# ---------------------------------------------------------------------------------------------


def _fake_command(job):
    return [sys.executable, str(Path(__file__).resolve()), "fake-train",
            str(job.recipe_path), str(job.run_dir)]


def _parent_main(recipe: str, out: str, workers: str) -> None:
    from hapo_cli.ablate import SubprocessRunner

    ok = run_ablation(recipe=recipe, components="AB", variants="none,A,B,AB", seeds="1",
                      output=Path(out), workers=int(workers),
                      runner=SubprocessRunner(command=_fake_command), poll_interval=0.05)
    sys.exit(0 if ok else 1)


def _start_parent(recipe, out, env):
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "ablate", str(recipe), str(out), "2"],
        cwd=ROOT, env=env, start_new_session=True,  # its own process group
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_sigkill_whole_ablation_then_rerun_completes(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    calls = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_CALLS": str(calls), "FAKE_STEP_S": "0.15",
           "PYTHONPATH": str(ROOT)}
    rec = yaml.safe_load(fake_recipe.read_text())
    rec["train"]["max_steps"] = 8
    rec["log"]["checkpoint_every"] = 1
    fake_recipe.write_text(yaml.safe_dump(rec))

    parent = _start_parent(fake_recipe, out, env)
    # kill once two runs are mid-way (each has a checkpoint at step >= 2 and is not done)
    deadline = time.time() + 90
    mid = []
    while time.time() < deadline:
        mid = [d for d in ("none-s1", "A-s1")
               if (latest_checkpoint_step(out / d) or 0) >= 2
               and json.loads((out / d / "manifest.json").read_text()).get("status") == "running"]
        if len(mid) == 2:
            break
        time.sleep(0.02)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    assert len(mid) == 2, parent.stdout.read().decode()
    time.sleep(0.3)  # the children died with the group: nothing writes any more
    assert _statuses(out)["none-s1"] == "running"

    parent = _start_parent(fake_recipe, out, env)
    output = parent.communicate(timeout=120)[0].decode()
    assert parent.returncode == 0, output
    assert set(_statuses(out).values()) == {"done"}
    starts: dict[str, list[int]] = {}
    for line in calls.read_text().splitlines():
        name, step = line.split()
        starts.setdefault(name, []).append(int(step))
    # none-s1 and A-s1 were resumed from a checkpoint, never repeated from scratch
    for name in ("none-s1", "A-s1"):
        assert starts[name][0] == 0 and len(starts[name]) == 2 and starts[name][1] >= 2
    assert starts["B-s1"][0] == 0 and starts["AB-s1"][0] == 0
    assert all(s > 0 for v in starts.values() for s in v[1:])
    for name in ("none-s1", "A-s1", "B-s1", "AB-s1"):
        assert _steps(out / name) == list(range(1, 9))  # contiguous, no duplicates


if __name__ == "__main__":
    if sys.argv[1] == "fake-train":
        calls = os.environ.get("FAKE_CALLS")
        sys.exit(fake_train(Path(sys.argv[2]), Path(sys.argv[3]),
                            step_s=float(os.environ.get("FAKE_STEP_S", "0")),
                            calls=Path(calls) if calls else None))
    if sys.argv[1] == "ablate":
        _parent_main(*sys.argv[2:5])


# ---------------------------------------------------------------------------------------------
# paper vs released entropy normalisation as variants; each run's recipe via load_recipe
# ---------------------------------------------------------------------------------------------


def test_released_variants_in_variants_syntax():
    assert parse_variants("none,abcd-released,ABCD", "ABCD") == ["none", "ABCD-released", "ABCD"]
    got = expand_variants("ABCD", variants="none,AD,AD-released")
    assert got == [Variant("none", "none"), Variant("AD", "AD"),
                   Variant("AD-released", "AD", ("algo.entropy_norm=released",))]
    # --compare-released adds the full method's twin unless --variants already names it
    names = [v.name for v in expand_variants("ABCD", variants="none,ABCD-released",
                                             compare_released=True)]
    assert names == ["none", "ABCD-released"]
    assert [v.name for v in expand_variants("CD", "single", compare_released=True)] == [
        "none", "C", "D", "CD-released"]


@pytest.mark.parametrize(
    "spec, letters, message",
    [
        ("B-released", "ABCD", "only changes A, C and D; 'B-released' would train exactly"),
        ("none-released", "ABCD", "'none-released' would train exactly like 'none'"),
        ("-released", "ABCD", "'-released' is not a variant"),
        ("AC-released", "AB", "uses C, which is not in --components AB"),
        ("A-releasd", "ABCD", "'A-releasd' is not a variant"),
    ],
)
def test_released_variant_errors(spec, letters, message):
    with pytest.raises(HapoError, match=message):
        parse_variants(spec, letters)


def test_compare_released_needs_a_letter_that_uses_entropy():
    with pytest.raises(HapoError, match="--compare-released: .*'B-released'"):
        expand_variants("B", compare_released=True)


class ReleasedRunner(FakeRunner):
    """The fake trainer, with validation accuracy lowered under the released normalisation:
    by 0.03 at seed 1 and 0.01 at seed 2."""

    def start(self, job):
        handle = super().start(job)
        rec = yaml.safe_load(job.recipe_path.read_text())
        if rec["algo"]["entropy_norm"] == "released":
            drop = {1: 0.03, 2: 0.01}[rec["seed"]]
            path = job.run_dir / "metrics.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            for r in rows:
                r["val/arith/avg@4"] = round(r["val/arith/avg@4"] - drop, 6)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return handle


def test_released_variant_runs_released_on_the_same_seeds(tmp_path, fake_recipe):
    out = tmp_path / "abl"
    console = _console()
    assert _ablate(fake_recipe, out, ReleasedRunner(), variants="none,A,A-released",
                   seeds="1,2", console=console)
    norms = {}
    for run in ("none-s1", "A-s1", "A-released-s1", "A-released-s2"):
        plan = yaml.safe_load((out / ".plans" / f"{run}.yaml").read_text())
        ran = yaml.safe_load((out / run / "recipe.yaml").read_text())
        assert plan == ran
        norms[run] = (plan["algo"]["entropy_norm"], plan["algo"]["adaptive_temperature"],
                      plan["seed"])
    assert norms == {"none-s1": ("paper", False, 1), "A-s1": ("paper", True, 1),
                     "A-released-s1": ("released", True, 1),
                     "A-released-s2": ("released", True, 2)}
    spec = json.loads((out / "ablation.json").read_text())
    assert spec["plan"][2] == {"variant": "A-released", "seed": 1, "run_dir": "A-released-s1",
                               "components": "A", "overrides": ["algo.entropy_norm=released"]}

    import pandas as pd

    df = pd.read_csv(out / "summary.csv", index_col="variant")
    m = "arith/avg@4/final"
    # final (step 4) val: none 0.05, 0.06; A 0.15, 0.16; A-released 0.12, 0.15
    # vs none: d = 0.07, 0.09 -> Δ 0.08, sd 0.014142, se 0.01, t = 8 with 1 dof:
    #   p = 1 - (2/pi) atan(8) = 0.0792 -> n.s.; CI 0.08 -+ 12.706 * 0.01
    assert df.at["A-released", f"{m}_pair_delta"] == pytest.approx(0.08)
    assert df.at["A-released", f"{m}_pair_p"] == pytest.approx(1 - 2 / math.pi * math.atan(8),
                                                               abs=1e-6)
    assert df.at["A-released", f"{m}_pair_ci_low"] == pytest.approx(0.08 - 12.706 * 0.01,
                                                                    abs=1e-4)
    assert df.at["A-released", f"{m}_pair_sig"] == 0.0
    # vs its paper twin A: d = -0.03, -0.01 -> Δ -0.02, se 0.01, t = -2: p = 1 - (2/pi) atan 2
    assert df.at["A-released", "reference"] == "A"
    assert df.at["A-released", f"{m}_ref_delta"] == pytest.approx(-0.02)
    assert df.at["A-released", f"{m}_ref_p"] == pytest.approx(1 - 2 / math.pi * math.atan(2),
                                                              abs=1e-6)
    assert df.at["A-released", f"{m}_ref_n"] == 2
    text = console.file.getvalue()
    assert "Released vs paper" in text and "│ A-released │  A │ -0.020 │" in text  # 2nd table
    md = (out / "summary.md").read_text()
    assert "| A-released | A | -0.020 | [-0.147, +0.107] | 0.295 | n.s. | 2 |" in md


def test_released_variants_on_a_released_recipe_are_refused(tmp_path, fake_recipe):
    with pytest.raises(HapoError, match="already has algo.entropy_norm=released"):
        _ablate(fake_recipe, tmp_path / "abl", FakeRunner(), variants="none,A,A-released",
                overrides=["algo.entropy_norm=released"])
    assert not (tmp_path / "abl").exists()


def test_every_run_recipe_comes_from_load_recipe(tmp_path, fake_recipe, monkeypatch):
    from hapo_cli.ablate import plan as plan_mod
    from hapo_cli.recipe import RecipeError, load_recipe

    calls = []

    def spy(path, overrides=None, components=None, seed=None):
        rec = load_recipe(path, overrides, components, seed)
        calls.append((list(overrides or []), components, seed, rec.to_yaml()))
        return rec

    monkeypatch.setattr(plan_mod, "load_recipe", spy)
    out = tmp_path / "abl"
    _ablate(fake_recipe, out, FakeRunner(), variants="none,A-released", workers=2)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for run, comps in (("none-s1", "none"), ("A-released-s1", "A")):
        written = (out / ".plans" / f"{run}.yaml").read_text()
        sets = [c[0] for c in calls if c[3] == written and c[1] == comps and c[2] == 1]
        assert sets and sets[-1][-1] == f"train.threads={threads}"  # the loader set it
    # so a bad value is refused by the recipe's validation, not copied into the plan
    rec = yaml.safe_load((out / "none-s1" / "recipe.yaml").read_text())
    rec["train"]["threads"] = 0
    (out / "none-s1" / "recipe.yaml").write_text(yaml.safe_dump(rec))
    _write_json(out / "none-s1" / "manifest.json", {"status": "running", "seed": 1})
    with pytest.raises(RecipeError, match="train.threads"):
        _ablate(fake_recipe, out, FakeRunner(), variants="none,A-released", workers=2)
