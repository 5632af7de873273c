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


@pytest.fixture(autouse=True)
def _submit_from_the_test_folder(tmp_path, monkeypatch):
    """sbatch runs where it is called: a requeued job's slurmstepd message ("CANCELLED ... DUE
    TO JOB REQUEUE") was written as slurm-N.out into the checkout's root (and committed)."""
    monkeypatch.chdir(tmp_path)


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
def ref5(tmp_path_factory, cache_dir):
    """The uninterrupted 5-step ABCD run the requeue / stop_job tests resume to."""
    out = tmp_path_factory.mktemp("ref5") / "abl"
    res = ablate(out, cache_dir, steps=5, variants="ABCD")
    assert res.exit_code == 0, res.output
    return out


_TWO_PROCESSES: dict[str, list[dict]] = {}


def two_local_processes(recipe: Path, out: Path) -> list[dict]:
    """Metrics of `recipe` as 2 gloo processes on this machine (once per recipe text)."""
    key = recipe.read_text()
    if key not in _TWO_PROCESSES:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                            "no", "-m", "hapo_cli.cli", "train", "--recipe", str(recipe),
                            "--output", str(out)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        _TWO_PROCESSES[key] = strip_times(read_metrics(out))
    return _TWO_PROCESSES[key]


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
    with RayHead(num_cpus=2, worker_cpus=(1,)) as r:  # two Ray nodes (the 2-node run)
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


def test_slurm_requeue_resumes_from_the_checkpoint(tmp_path, cache_dir, slurm, ref5):
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
    assert metrics(out) == metrics(ref5)


def test_slurm_two_nodes_equal_two_local_processes(tmp_path, cache_dir, slurm):
    out = tmp_path / "abl"
    cfg = config(tmp_path, slurm={"time": "20", "nodes": 2})
    res = ablate(out, cache_dir, "--launcher", "slurm", "--launcher-config", str(cfg),
                 variants="ABCD")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "ABCD-s1" / schema.MANIFEST).read_text())
    assert manifest["world_size"] == 2
    assert two_local_processes(out / ".plans" / "ABCD-s1.yaml", tmp_path / "local") == \
        metrics(out)["ABCD-s1"]


def job_fields(job: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True,
                           text=True).stdout
    return dict(tok.split("=", 1) for tok in shown.split() if "=" in tok)


def test_slurm_time_limit_checkpoints_requeues_and_resumes(tmp_path, cache_dir, slurm):
    """The time limit comes near: Slurm's USR2 (`--signal=USR2@120`, submitit's) reaches the
    run, which checkpoints its step and ends `interrupted` (time limit); submitit requeues the
    job, whose next start resumes to the uninterrupted run's metrics. Slurm's minimum limit is
    a minute and it checks limits on a ~30 s tick, so the job is submitted with 20 minutes and,
    once training, its limit is brought to ~1-2 minutes away (`scontrol update TimeLimit`):
    USR2 comes at the next tick. 150 steps outlast that tick with room: 50 steps once took
    only ~25 s from submission to the end on an idle machine, and finished before USR2 came."""
    steps = 150
    # the uninterrupted reference, on this machine, while the Slurm job runs (a core each)
    ref = tmp_path / "ref"
    ref_proc = subprocess.Popen(
        [sys.executable, "-m", "hapo_cli.cli", "ablate", "--recipe", "tiny/hapo", "--variants",
         "ABCD", "--seeds", "1", "--max-steps", str(steps), "--output", str(ref),
         *sets(cache_dir, "train.threads=1", "eval.every=0")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        out = tmp_path / "abl"
        cfg = config(tmp_path, slurm={"time": "20", "signal_seconds": 120})
        args = ("--launcher", "slurm", "--launcher-config", str(cfg), "--max-attempts", "3")
        res = ablate(out, cache_dir, *args, "--detach", steps=steps, variants="ABCD")
        assert res.exit_code == 0, res.output
        job, env = spec(out)["runs"]["ABCD-s1"]["job_id"], slurm.env
        wait_step(out / "ABCD-s1", 1)
        h, m, sec = (int(x) for x in job_fields(job, env)["RunTime"].split("-")[-1].split(":"))
        limit = (h * 60 + m) + (1 if sec else 0) + 1  # 60-120 s from now: <= the 120 s warning
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], env=env,
                       check=True)
        end = time.time() + 240
        while time.time() < end:  # USR2, checkpoint, submitit's `scontrol requeue`: pending again
            kv = job_fields(job, env)
            if kv.get("JobState") == "PENDING" and kv.get("Restarts") == "1":
                break
            assert kv.get("JobState") != "COMPLETED", (
                f"job {job} ended before Slurm's USR2: {steps} steps are too few here ({kv})")
            time.sleep(0.25)
        else:
            raise AssertionError(f"job {job} was not requeued within 240 s: {kv}")
        # its next start gets the whole limit again (else it would be warned at once)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], env=env, check=True)
        manifest = json.loads((out / "ABCD-s1" / schema.MANIFEST).read_text())
        assert (manifest["status"], manifest["reason"]) == ("interrupted", "time limit")
        stopped_at = manifest["final_step"]
        assert 1 <= stopped_at < steps
        res = ablate(out, cache_dir, *args, steps=steps, variants="ABCD")  # reconciles and watches
        assert res.exit_code == 0, res.output
        st = spec(out)["runs"]["ABCD-s1"]
        assert (st["status"], st["job_id"], st["attempts"]) == ("done", job, 2)
        log = (out / "logs" / "ABCD-s1.log").read_text()
        assert "time limit, SIGUSR2" in log and "restart 1" in log
        assert ref_proc.wait(timeout=600) == 0, ref_proc.stderr.read()[-2000:]
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    assert metrics(out) == metrics(ref)


def test_slurm_munge_or_controller_down_is_one_line(tmp_path, cache_dir, slurm, local_runs,
                                                     monkeypatch):
    """munged stopped (by pid, restarted after) or slurmctld unreachable: one line naming it
    and the command that checks it, exit 2, nothing submitted, the ablation folder as it was."""
    import re

    from local_cluster import free_port

    out = tmp_path / "abl"
    shutil.copytree(local_runs, out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    cfg = config(tmp_path, slurm={"time": "20"})
    args = ("--launcher", "slurm", "--launcher-config", str(cfg))

    def one_line_exit_2(res, *words):
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert all(w in lines[0] for w in words), lines[0]

    slurm.stop_munge()
    try:
        res = ablate(out, cache_dir, *args)
    finally:
        slurm.start_munge()
    one_line_exit_2(res, "munge does not answer", f"munge -n -S {slurm.munge_socket}")
    # slurmctld unreachable: a client config naming a port nothing listens on (~9 s of retries)
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={free_port()}",
                           slurm.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    res = ablate(out, cache_dir, *args)
    one_line_exit_2(res, "slurmctld does not answer", "scontrol ping")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    queue = subprocess.run(["squeue", "-h"], env=slurm.env, capture_output=True, text=True)
    assert queue.returncode == 0 and queue.stdout.strip() == ""


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


def test_ray_stop_job_then_rerun_resumes(tmp_path, cache_dir, ray_head, ref5):
    from ray.job_submission import JobSubmissionClient

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
    assert metrics(out) == metrics(ref5)


def test_ray_two_nodes_equal_two_local_processes(tmp_path, cache_dir, ray_head):
    """`ray: {nodes: 2}`: one rank on each of the two Ray nodes (a STRICT_SPREAD placement
    group), accelerate across them over gloo: the 2-process local run's metrics."""
    out = tmp_path / "abl"
    cfg = config(tmp_path, ray={"address": ray_head.address, "num_cpus": 1, "nodes": 2})
    res = ablate(out, cache_dir, "--launcher", "ray", "--launcher-config", str(cfg),
                 variants="ABCD")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "ABCD-s1" / schema.MANIFEST).read_text())
    assert manifest["world_size"] == 2
    import re

    log = (out / "logs" / "ABCD-s1.log").read_text()
    ranks = dict(re.findall(r"rank (\d) of 2 on node (\w+)", log))
    assert set(ranks) == {"0", "1"} and ranks["0"] != ranks["1"], log[-2000:]
    assert two_local_processes(out / ".plans" / "ABCD-s1.yaml", tmp_path / "local") == \
        metrics(out)["ABCD-s1"]
