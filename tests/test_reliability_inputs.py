"""Reliability (issue 30, items 5-8, 11, 12 and the smaller ones; issue 25's interrupted run):
each case is the command, its exit code, its first line, and what is on disk before and after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics
from test_reliability import copy_run, one_error_line, snapshot, train_args
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step tiny/hapo run (lr 2e-4, seed 1, ABCD), checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("done") / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 2, "log.checkpoint_every=1"))
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny policy folder (model + tokenizer): loads in milliseconds."""
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    d = tmp_path_factory.mktemp("model")
    tok = build_tokenizer()
    build_tiny_model(TinyModelConfig(), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def manifest(run: Path) -> dict:
    return json.loads((run / schema.MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------
# 5. --resume after recipe.yaml was deleted
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, expect", [
    (["--recipe", "tiny/dapo"], "manifest.json: components: 'ABCD' -> 'none'"),
    (["--seed", "2"], "manifest.json: seed: 1 -> 2"),
    (["--set", "train.lr=1e-3"], "checkpoint step-000002: train.lr: 0.0002 -> 0.001"),
])
def test_resume_without_recipe_yaml_refuses_another_recipe(tmp_path, cache_dir, done_run, change,
                                                            expect):
    run = copy_run(done_run, tmp_path / "run")
    (run / schema.RECIPE).unlink()
    before = snapshot(run)
    res = runner.invoke(app, [*train_args(run, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume", *change])
    assert res.exit_code == 2, res.output
    line = one_error_line(res)
    assert line.startswith(f"error: {run}: --resume with a different recipe (recipe.yaml is "
                           "missing; "), line
    assert line.endswith(f"{expect}); nothing was changed; use the run's recipe or a new "
                         "--output"), line
    assert snapshot(run) == before  # no recipe.yaml written, manifest still ABCD / done
    assert manifest(run)["components"] == "ABCD" and manifest(run)["status"] == "done"


def test_resume_without_recipe_yaml_continues_with_the_same_recipe(tmp_path, cache_dir, done_run):
    run = copy_run(done_run, tmp_path / "run")
    (run / schema.RECIPE).unlink()
    res = runner.invoke(app, [*train_args(run, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    m = manifest(run)
    assert (m["status"], m["components"], m["resumed_from"]) == ("done", "ABCD", "step-000002")
    state = json.loads((run / schema.CHECKPOINTS_DIR / "step-000003" / "trainer_state.json")
                       .read_text())
    assert state["recipe"]["algo"]["adaptive_clip"] is True  # what the checkpoint trained with
    assert state["recipe"]["train"]["lr"] == 2e-4


# ---------------------------------------------------------------------------------------------
# 6. a warm-up that misses its target accuracy
# ---------------------------------------------------------------------------------------------


def test_warmup_that_misses_its_target_is_one_warning_line(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 0, "model.warmup.steps=0",
                                        "eval.every=0"))
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.output.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, res.output
    assert warnings[0].startswith(
        "warning: the warm-up policy missed model.warmup.target_acc=0.3: held-out greedy "
        "accuracy 0.000 after 0 steps (model.warmup.steps=0 is the cap; "), warnings[0]
    # cached now: the second use says it again (the cache holds the shortfall, not a secret)
    res = runner.invoke(app, [*train_args(out, cache_dir, 0, "model.warmup.steps=0",
                                          "eval.every=0"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sum(x.startswith("warning: the warm-up policy missed") for x in
               res.output.splitlines()) == 1


@pytest.mark.parametrize("target, probe, warns", [
    (0.3, 0.31, False), (0.3, 0.3, False), (0.3, 0.29, True), (0.3, None, True),
    (None, 0.0, False),  # target_acc=null: a fixed step count was asked for
])
def test_warmup_shortfall_compares_the_probe_with_the_target(tmp_path, target, probe, warns):
    from hapo_cli.models import warmup_shortfall

    info = {"target_acc": target, "probe_acc": probe, "heldout_greedy_acc": 0.125,
            "steps_run": 40, "warmup": {"steps": 40}}
    (tmp_path / "warmup.json").write_text(json.dumps(info))
    line = warmup_shortfall(tmp_path)
    assert (line is not None) == warns
    if warns:
        assert "accuracy 0.125 after 40 steps (model.warmup.steps=40 is the cap" in line


# ---------------------------------------------------------------------------------------------
# 7. a checkpoint without tokenizer.json
# ---------------------------------------------------------------------------------------------


def test_checkpoint_without_tokenizer_json_is_not_loadable(tmp_path, done_run):
    from hapo_cli.learner.resume import usable_checkpoint

    run = copy_run(done_run, tmp_path / "run")
    latest = run / schema.CHECKPOINTS_DIR / "step-000002"
    (latest / "tokenizer.json").unlink()
    ckpt, skipped = usable_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-000001"
    assert len(skipped) == 1
    assert skipped[0].startswith("step-000002: ") and "tokenizer has no vocabulary" in skipped[0]
    before = snapshot(run)
    res = runner.invoke(app, ["evaluate", str(run), "--bench", "arith", "--limit", "2"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == (
        f"error: {latest}: the tokenizer has no vocabulary (no tokenizer.json): it encodes "
        "'1+2=3' to 0 known tokens (4 tokens in all); restore its tokenizer files")
    assert snapshot(run) == before


def test_resume_falls_back_past_a_checkpoint_without_tokenizer_json(tmp_path, cache_dir,
                                                                    done_run):
    run = copy_run(done_run, tmp_path / "run")
    (run / schema.CHECKPOINTS_DIR / "step-000002" / "tokenizer.json").unlink()
    res = runner.invoke(app, [*train_args(run, cache_dir, 3, "log.checkpoint_every=1"),
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert "skipping unreadable checkpoint step-000002" in res.output
    assert "continuing from step-000001" in res.output
    m = manifest(run)
    assert (m["status"], m["resumed_from"]) == ("done", "step-000001")  # not `failed`
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# 8. empty, whitespace-only, all-unknown prompts
# ---------------------------------------------------------------------------------------------

BAD_PROMPTS = [
    ('""', "line 2: 'prompt' is empty; expected a question"),
    ('"  \\t "', "line 2: 'prompt' is whitespace only ('  \\t '); expected a question"),
    ('[{"role": "user", "content": " "}]', "line 2: 'prompt' is whitespace only (' ')"),
    ('"\\u20ac\\u00a7"', "line 2: 'prompt' ('€§') is 2 unknown tokens: none is in the "
     "tokenizer's vocabulary"),
]


def _prompts_file(path: Path, bad_prompt: str) -> Path:
    good = '{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}'
    path.write_text(f'{good}\n{{"prompt": {bad_prompt}, "reward_model": {{"ground_truth": "2"}}}}\n')
    return path


@pytest.mark.parametrize("bad_prompt, expect", BAD_PROMPTS)
def test_bad_prompt_in_a_benchmark_is_one_line(tmp_path, model_dir, bad_prompt, expect):
    bench = _prompts_file(tmp_path / "b.jsonl", bad_prompt)
    res = runner.invoke(app, ["evaluate", str(model_dir), "--bench", str(bench), "--out",
                              str(tmp_path / "o"), "--n", "1"])
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith(f"error: {bench} {expect}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad_prompt, expect", BAD_PROMPTS[::3])
def test_bad_prompt_in_train_files_is_one_line_before_training(tmp_path, cache_dir, model_dir,
                                                                bad_prompt, expect):
    data = _prompts_file(tmp_path / "train.jsonl", bad_prompt)
    out = tmp_path / "run"
    res = runner.invoke(app, train_args(out, cache_dir, 2, "model.init=pretrained",
                                        "model.warmup=null", f"model.path={model_dir}",
                                        "data.source=files", f"data.train_files=[{data}]"))
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith(f"error: {data} {expect}")
    assert not out.exists()  # refused at load, not steps into training


def test_a_prompt_of_unknown_characters_in_the_fresh_tokenizer(model_dir):
    """The in-memory character tokenizer maps unknown characters to <unk> (the saved one drops
    them): all-<unk> is refused too, one <unk> among known characters is not."""
    from hapo_cli.data import DataError
    from hapo_cli.data.files import check_prompt_content
    from hapo_cli.models import build_tokenizer

    tok = build_tokenizer()
    ids = tuple(tok("€§", add_special_tokens=False)["input_ids"])
    assert ids == (tok.unk_token_id,) * 2
    with pytest.raises(DataError, match=r"f line 2: 'prompt' \('€§'\) is 2 unknown tokens"):
        check_prompt_content("€§", "€§", ids, tok, "f line 2", "prompt")
    mixed = tuple(tok("1+€", add_special_tokens=False)["input_ids"])
    check_prompt_content("1+€", "1+€", mixed, tok, "f line 2", "prompt")
    # a tokenizer without an unknown token drops what it cannot read: nothing is left
    with pytest.raises(DataError, match=r"f line 2: 'prompt' \('€§'\) encodes to 0 tokens"):
        check_prompt_content("€§", "€§", (), tok, "f line 2", "prompt")


# ---------------------------------------------------------------------------------------------
# 11. seeds out of range; smaller: --components '', --grid bogus with --variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, expect", [
    ("-1", "seed=-1: Input should be greater than or equal to 0"),
    ("4294967296", "seed=4294967296: Input should be less than or equal to 4294967295"),
])
def test_train_seed_out_of_range_is_one_line(tmp_path, cache_dir, seed, expect):
    out = tmp_path / "run"
    res = runner.invoke(app, [*train_args(out, cache_dir, 1), "--seed", seed])
    assert res.exit_code == 2, res.output
    line = one_error_line(res)
    assert line.startswith("error: recipe error (") and line.endswith(expect), line
    assert not out.exists()


def test_seed_range_edges_in_the_recipe():
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--set", "seed=4294967295",
                              "--set", "model.warmup.seed=4294967295"])
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load(res.output)
    assert (rec["seed"], rec["model"]["warmup"]["seed"]) == (2**32 - 1, 2**32 - 1)
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--set", "model.warmup.seed=-1"])
    assert res.exit_code == 2
    assert "model.warmup.seed=-1: Input should be greater than or equal to 0" in one_error_line(res)


@pytest.mark.parametrize("args, expect", [
    (["--seeds", "1,4294967296"], "error: --seeds '1,4294967296': a seed must be in "
     "0..4294967295, got 4294967296"),
    (["--seeds", "-1"], "error: --seeds '-1': a seed must be in 0..4294967295, got -1"),
    (["--components", ""], "error: --components '': empty; use letters of ABCD"),
    (["--grid", "bogus", "--variants", "none,A"], "error: --grid 'bogus' is not one of: paper, "
     "single, leave-one-out, all"),
])
def test_ablate_bad_flags_are_one_line_nothing_written(tmp_path, args, expect):
    out = tmp_path / "abl"
    res = runner.invoke(app, ["ablate", "--output", str(out), *args])
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith(expect)
    assert not out.exists()


@pytest.mark.parametrize("components", ["", "  "])
def test_train_empty_components_is_one_line(tmp_path, cache_dir, components):
    out = tmp_path / "run"
    res = runner.invoke(app, [*train_args(out, cache_dir, 1), "--components", components])
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith(f"error: --components {components!r}: empty; ")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 12. hapo ablate --output: a file, a training run, under a file
# ---------------------------------------------------------------------------------------------


def test_ablate_output_that_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    res = runner.invoke(app, ["ablate", "--variants", "none", "--output", str(f)])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == f"error: --output {f}: is a file; expected an ablation directory"
    assert f.read_text() == "keep"
    res = runner.invoke(app, ["ablate", "--variants", "none", "--output", str(f / "abl")])
    assert res.exit_code == 2, res.output
    assert one_error_line(res).startswith(
        f"error: --output: cannot create the ablation directory: {f / 'abl'}: Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_ablate_output_that_is_a_training_run(tmp_path, done_run):
    run = copy_run(done_run, tmp_path / "run")
    before = snapshot(run)
    res = runner.invoke(app, ["ablate", "--variants", "none", "--output", str(run)])
    assert res.exit_code == 2, res.output
    assert one_error_line(res) == (f"error: --output {run}: holds a training run (manifest.json), "
                                   "not an ablation; choose another --output (nothing was "
                                   "changed)")
    assert snapshot(run) == before
    assert not (run / schema.ABLATION).exists() and not (run / ".ablation.lock").exists()


# ---------------------------------------------------------------------------------------------
# issue 25: a run interrupted from outside while the ablation goes on
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_recipe(tmp_path):
    """test_ablate's fake recipe: a 'pretrained' placeholder policy, 4 steps, checkpoints
    every 2 (the fake trainer never loads a model)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fake", "seed": 1, "model": {"init": "pretrained", "path": str(model)},
        "train": {"max_steps": 4, "threads": 7}, "eval": {"every": 2},
        "log": {"checkpoint_every": 2},
    }))
    return path


def test_run_interrupted_from_outside_is_resumed_by_a_rerun(tmp_path, fake_recipe):
    import test_ablate as ta

    class SigtermedOnce(ta.FakeRunner):
        """A-s1 is stopped by an outside SIGTERM after step 3 (checkpoint at 2): `hapo train`
        writes the manifest `interrupted` and exits 130."""

        def start(self, job):
            handle = super().start(job)
            if job.name != "A-s1":
                return handle
            shutil.rmtree(job.run_dir / "checkpoints" / "step-000004")
            rows = (job.run_dir / "metrics.jsonl").read_text().splitlines()[:3]
            (job.run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
            m = json.loads((job.run_dir / "manifest.json").read_text())
            m.update(status="interrupted", final_step=3,
                     message="interrupted at step 3; continue with --resume")
            (job.run_dir / "manifest.json").write_text(json.dumps(m))
            return ta.FakeHandle(130)

    out = tmp_path / "abl"
    assert ta._ablate(fake_recipe, out, SigtermedOnce(), variants="none,A") is False
    spec = json.loads((out / schema.ABLATION).read_text())
    st = spec["runs"]["A-s1"]
    assert (st["status"], st["rc"], st["error"]) == (
        "interrupted", 130, "interrupted at step 3; continue with --resume")
    assert spec["runs"]["none-s1"]["status"] == "done"

    again = ta.FakeRunner()  # the same command, no --retry-failed
    assert ta._ablate(fake_recipe, out, again, variants="none,A") is True
    assert again.calls == [("A-s1", 2)]  # resumed from its checkpoint, none-s1 skipped
    assert ta._statuses(out) == {"none-s1": "done", "A-s1": "done"}
    assert ta._steps(out / "A-s1") == [1, 2, 3, 4]
    assert json.loads((out / schema.ABLATION).read_text())["runs"]["A-s1"]["attempts"] == 2
