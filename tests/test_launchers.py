"""`hapo ablate --launcher ...`: bad input is one line, exit 2, nothing written or submitted
(no cluster needed); the launcher config's parsing; a Slurm array's task ids."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hapo_cli.ablate.launchers import LauncherError, launcher_names, load_launcher
from hapo_cli.ablate.launchers.slurm import _tasks, minutes
from hapo_cli.cli import app

runner = CliRunner()


def one_line_exit_2(res, *words):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("section, words", [
    ({"slurm": {"partitoin": "gpu"}}, ["slurm.partitoin", "Extra inputs"]),
    ({"slurm": {"time": "soon"}}, ["slurm.time", "not a Slurm time"]),
    ({"slurm": {"nodes": 0}}, ["slurm.nodes"]),
    ({"kubernetes": {}}, ["unknown section 'kubernetes'"]),
    ({"ray": {"num_gpus": -1}}, ["num_gpus"]),
], ids=["typo", "time", "nodes", "section", "ray"])
def test_invalid_launcher_config_is_one_line_and_nothing_is_written(tmp_path, section, words):
    import yaml

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(section))
    out = tmp_path / "abl"
    name = next(iter(section)) if next(iter(section)) in launcher_names() else "slurm"
    res = runner.invoke(app, ["ablate", "--variants", "none", "--launcher", name,
                              "--launcher-config", str(cfg), "--output", str(out)])
    one_line_exit_2(res, *words)
    assert not out.exists()


def test_no_sbatch_unreachable_ray_unknown_launcher_detach_local(tmp_path, monkeypatch):
    out = tmp_path / "abl"
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm client on PATH
    res = runner.invoke(app, ["ablate", "--variants", "none", "--launcher", "slurm",
                              "--output", str(out)])
    one_line_exit_2(res, "`sbatch` is not on PATH")
    monkeypatch.undo()
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("ray:\n  address: http://127.0.0.1:9\n")  # discard port: nothing answers
    res = runner.invoke(app, ["ablate", "--variants", "none", "--launcher", "ray",
                              "--launcher-config", str(cfg), "--output", str(out)])
    one_line_exit_2(res, "ray.address='http://127.0.0.1:9'", "no Ray cluster answers")
    res = runner.invoke(app, ["ablate", "--variants", "none", "--launcher", "pbs",
                              "--output", str(out)])
    one_line_exit_2(res, "'pbs' is not one of: local, ray, slurm")
    res = runner.invoke(app, ["ablate", "--variants", "none", "--detach", "--output", str(out)])
    one_line_exit_2(res, "--detach needs a cluster")
    res = runner.invoke(app, ["ablate", "--variants", "none", "--max-attempts", "0",
                              "--output", str(out)])
    one_line_exit_2(res, "--max-attempts must be >= 1")
    assert not out.exists()
    res = runner.invoke(app, ["ablate", "status", str(out)])
    one_line_exit_2(res, "no ablation.json")


def test_config_parsing(tmp_path):
    launcher = load_launcher("slurm", {"slurm": {"time": "1-12:30", "setup": ["module load x"]},
                                       "ray": {"address": "http://h:8265"}}, "/tmp/abl")
    assert launcher.cfg.setup == ["module load x"] and minutes(launcher.cfg.time) == 2190
    assert load_launcher("local", None, "/tmp/abl") is None
    (tmp_path / "c.yaml").write_text("- slurm\n")
    with pytest.raises(LauncherError, match="expected a mapping"):
        load_launcher("slurm", tmp_path / "c.yaml", "/tmp/abl")
    # Slurm's time forms, in minutes (a started minute counts)
    assert [minutes(t) for t in ("30", "30:15", "24:00:00", "1-12", "1-12:30")] == \
        [30, 31, 1440, 2160, 2190]
    # an array's pending record names its task ids as a range
    assert _tasks("0-3%2") == ["0", "1", "2", "3"] and _tasks("1,4-5") == ["1", "4", "5"]
