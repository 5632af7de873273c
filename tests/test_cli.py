"""CLI shell: help of every command, recipes list/show, one-line errors with exit code 2."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from hapo_cli.cli import app

runner = CliRunner()


def test_root_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "evaluate", "ablate", "analyze", "recipes"):
        assert cmd in res.output


@pytest.mark.parametrize(
    "cmd", [["train"], ["evaluate"], ["ablate"], ["analyze"], ["recipes"], ["recipes", "show"],
            ["recipes", "list"]]
)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_recipes_list():
    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0
    assert "tiny/hapo" in res.output and "tiny/forking" in res.output


def test_recipes_show_resolves_components_and_sets():
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--components", "BD",
                              "--set", "train.lr=5e-5"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert data["algo"]["adaptive_temperature"] is False
    assert data["algo"]["token_level_advantage"] is True
    assert data["algo"]["adaptive_clip"] is True
    assert data["train"]["lr"] == pytest.approx(5e-5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("algo:\n  bogus: 1\n", "algo.bogus"),
        ("train:\n  lr: [1]\n", "train.lr"),
        ("algo:\n  eps_low: 1.5\n", "algo.eps_low"),  # <= 1 (1: no lower bound, CISPO)
        ("algo:\n  entropy_pivot: -0.1\n", "algo.entropy_pivot"),
        ("algo:\n  tau: -1\n", "algo.tau"),
    ],
)
@pytest.mark.parametrize("command", ["show", "train"])
def test_bad_recipe_exits_2_naming_field(tmp_path, body, field, command):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    args = (["recipes", "show", str(p)] if command == "show"
            else ["train", "--recipe", str(p), "--output", str(tmp_path / "run")])
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert field in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_bad_components_exit_2():
    res = runner.invoke(app, ["recipes", "show", "tiny/hapo", "--components", "XYZ"])
    assert res.exit_code == 2
    assert "unknown letter" in res.output


def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("algo:\n  bogus: 1\n")
    res = runner.invoke(app, ["--debug", "recipes", "show", str(p)])
    assert res.exit_code != 0
    assert res.exception is not None


def test_analyze_rejects_missing_dir(tmp_path):
    res = runner.invoke(app, ["analyze", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "not a directory" in res.output


def test_analyze_writes_report_from_a_run_dir(tmp_path):
    from analysis.synthetic import write_run

    run = tmp_path / "run"
    write_run(run, seed=1)
    res = runner.invoke(app, ["analyze", str(run), "--format", "png"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    report = run / "analysis" / "report.md"
    assert report.exists() and (run / "analysis" / "report.html").exists()
    pngs = list((run / "analysis").rglob("*.png"))
    assert len(pngs) >= 5
    res = runner.invoke(app, ["analyze", str(run), "--format", "gif"])
    assert res.exit_code == 2 and "gif" in res.output


def test_analyze_of_a_folder_without_runs_exits_2(tmp_path):
    res = runner.invoke(app, ["analyze", str(tmp_path)])
    assert res.exit_code == 2
    assert "neither a run directory" in res.output and "Traceback" not in res.output
