"""`hapo ablate --launcher slurm|ray` against a real one-machine Slurm (two nodes) and a real
local Ray head (scripts/local_cluster.py brings them up and stops them by pid). No mocks; a
machine that cannot bring the cluster up fails here, loudly (the fixtures raise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics, sets, strip_times
from typer.testing import CliRunner

from analysis import schema
from hapo_cli.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from local_cluster import RayHead, SlurmCluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # make test-cluster
runner = CliRunner()
VARIANTS = "none,ABCD"


def ablate(out: Path, cache_dir: Path, *extra: str, steps: int = 3, variants: str = VARIANTS):
    args = ["ablate", "--recipe", "tiny/hapo", "--variants", variants, "--seeds", "1",
            "--max-steps", str(steps), "--output", str(out), *extra,
            *sets(cache_dir, "train.threads=1", "eval.every=0")]
    return runner.invoke(app, args)


def metrics(out: Path) -> dict[str, list[dict]]:
    return {d.name: strip_times(read_metrics(d)) for d in sorted(out.iterdir())
            if (d / schema.METRICS).exists()}


def spec(out: Path) -> dict:
    return json.loads((out / schema.ABLATION).read_text())


def summary(out: Path):
    from hapo_cli.ablate import show_summary

    df = show_summary(out, console=None)
    return df[[c for c in df.columns if "time" not in str(c)]].reset_index(drop=True)


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("local") / "abl"
    res = ablate(out, cache_dir)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def slurm():
    with SlurmCluster() as c:
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(c.conf)
        try:
            yield c
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def ray_head():
    with RayHead() as r:
        yield r


def config(tmp_path: Path, **section) -> Path:
    import yaml

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(section))
    return path


def wait_step(run: Path, step: int, deadline_s: float = 300) -> None:
    end = time.time() + deadline_s
    while time.time() < end:
        if (run / schema.METRICS).exists() and any(r.get("step", 0) >= step
                                                   for r in read_metrics(run)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{run} did not reach step {step} within {deadline_s} s")


def test_slurm_ablation_equals_the_local_one(tmp_path, cache_dir, slurm, local_runs):
    out = tmp_path / "abl"
    cfg = config(tmp_path, slurm={"time": "20", "cpus_per_task": 1})
    t0 = time.time()
    res = ablate(out, cache_dir, "--launcher", "slurm", "--launcher-config", str(cfg))
    print(f"slurm ablation of 2 runs: {time.time() - t0:.1f} s")
    assert res.exit_code == 0, res.output
    s = spec(out)
    assert s["launcher"]["name"] == "slurm"
    assert {r: (st["status"], st["attempts"]) for r, st in s["runs"].items()} == {
        "none-s1": ("done", 1), "ABCD-s1": ("done", 1)}
    assert all("_" in st["job_id"] for st in s["runs"].values())  # one array
    assert metrics(out) == metrics(local_runs)
    assert summary(out).equals(summary(local_runs))
    # a rerun reconciles: nothing is submitted again
    res = ablate(out, cache_dir, "--launcher", "slurm", "--launcher-config", str(cfg))
    assert res.exit_code == 0 and "0 to submit" in res.output, res.output
    res = runner.invoke(app, ["ablate", "status", str(out)])
    assert res.exit_code == 0 and res.output.count("done") == 2, res.output


def test_slurm_requeue_resumes_from_the_checkpoint(tmp_path, cache_dir, slurm, local_runs):
    ref = tmp_path / "ref"
    assert ablate(ref, cache_dir, steps=5, variants="ABCD").exit_code == 0
    out = tmp_path / "abl"
    cfg = config(tmp_path, slurm={"time": "20"})
    args = ("--launcher", "slurm", "--launcher-config", str(cfg))
    res = ablate(out, cache_dir, *args, "--detach", steps=5, variants="ABCD")
    assert res.exit_code == 0, res.output
    job = spec(out)["runs"]["ABCD-s1"]["job_id"]
    wait_step(out / "ABCD-s1", 2)
    env = slurm.env
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    end = time.time() + 120
    while time.time() < end:  # once pending again (Reason=BeginTime, ~128 s): start it now
        shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                               text=True).stdout
        if "Reason=BeginTime" in shown:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                           check=True)
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"job {job} was not pending on BeginTime after the requeue")
    res = runner.invoke(app, ["ablate", "status", str(out)])
    assert res.exit_code == 0, res.output
    res = ablate(out, cache_dir, *args, steps=5, variants="ABCD")  # reconciles and watches
    assert res.exit_code == 0, res.output
    st = spec(out)["runs"]["ABCD-s1"]
    assert (st["status"], st["job_id"], st["attempts"]) == ("done", job, 2)
    log = (out / "logs" / "ABCD-s1.log").read_text()
    assert "preempted, SIGTERM" in log and "restart 1" in log
    assert metrics(out) == metrics(ref)


def test_slurm_two_nodes_equal_two_local_processes(tmp_path, cache_dir, slurm):
    out = tmp_path / "abl"
    cfg = config(tmp_path, slurm={"time": "20", "nodes": 2})
    res = ablate(out, cache_dir, "--launcher", "slurm", "--launcher-config", str(cfg),
                 variants="ABCD")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "ABCD-s1" / schema.MANIFEST).read_text())
    assert manifest["world_size"] == 2
    local = tmp_path / "local"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                        "no", "-m", "hapo_cli.cli", "train", "--recipe",
                        str(out / ".plans" / "ABCD-s1.yaml"), "--output", str(local)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert strip_times(read_metrics(local)) == metrics(out)["ABCD-s1"]


def test_ray_ablation_equals_the_local_one(tmp_path, cache_dir, ray_head, local_runs):
    out = tmp_path / "abl"
    cfg = config(tmp_path, ray={"address": ray_head.address, "num_cpus": 1})
    t0 = time.time()
    res = ablate(out, cache_dir, "--launcher", "ray", "--launcher-config", str(cfg))
    print(f"ray ablation of 2 runs: {time.time() - t0:.1f} s")
    assert res.exit_code == 0, res.output
    assert {r: st["status"] for r, st in spec(out)["runs"].items()} == {
        "none-s1": "done", "ABCD-s1": "done"}
    assert metrics(out) == metrics(local_runs)
    assert summary(out).equals(summary(local_runs))


def test_ray_stop_job_then_rerun_resumes(tmp_path, cache_dir, ray_head):
    from ray.job_submission import JobSubmissionClient

    ref = tmp_path / "ref"
    assert ablate(ref, cache_dir, steps=5, variants="ABCD").exit_code == 0
    out = tmp_path / "abl"
    cfg = config(tmp_path, ray={"address": ray_head.address, "num_cpus": 1})
    args = ("--launcher", "ray", "--launcher-config", str(cfg))
    assert ablate(out, cache_dir, *args, "--detach", steps=5, variants="ABCD").exit_code == 0
    job = spec(out)["runs"]["ABCD-s1"]["job_id"]
    wait_step(out / "ABCD-s1", 2)
    client = JobSubmissionClient(ray_head.address)
    client.stop_job(job)
    end = time.time() + 120
    while time.time() < end and str(client.get_job_status(job)) != "STOPPED":
        time.sleep(0.5)
    manifest = json.loads((out / "ABCD-s1" / schema.MANIFEST).read_text())
    assert (manifest["status"], manifest["reason"]) == ("interrupted", "preempted")
    res = ablate(out, cache_dir, *args, steps=5, variants="ABCD")  # resubmits attempt 2
    assert res.exit_code == 0, res.output
    st = spec(out)["runs"]["ABCD-s1"]
    assert (st["status"], st["attempts"]) == ("done", 2) and st["job_id"] != job
    assert metrics(out) == metrics(ref)
