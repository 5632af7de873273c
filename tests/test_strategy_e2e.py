"""`accelerate launch --config_file recipes/accelerate/{fsdp,zero2,zero3}.yaml --num_processes 2
-m hapo_cli train --recipe tiny/hapo` on CPU (gloo): each shards as it should, matches the
2-process DDP run at step 1, a `kill -9` of the launcher and its ranks + `--resume` reproduces
the uninterrupted run, and the checkpoints load in transformers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import failure_report

from analysis import schema

ROOT = Path(__file__).resolve().parent.parent
SETS = [
    "model.warmup.steps=150", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
    "train.micro_batch_size=4", "rollout.n=4", "eval.limit=8", "eval.n=2", "eval.every=2",
    "train.dynamic_sampling.enabled=false", "log.checkpoint_every=1", "log.keep_checkpoints=10",
]
STEPS = 4


def _train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["-m", "hapo_cli.cli", "train", "--recipe", "tiny/hapo", "--max-steps", str(STEPS),
            "--output", str(out), *extra]
    for s in [*SETS, f"model.cache_dir={cache}"]:
        args += ["--set", s]
    return args


def _launch(strategy: str) -> list[str]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed next to the interpreter"
    if strategy in ("fsdp", "zero2", "zero3"):
        return [accelerate, "launch", "--config_file",
                str(ROOT / f"recipes/accelerate/{strategy}.yaml"),
                "--num_processes", "2", "--mixed_precision", "no"]
    # NB: on a machine without CUDA `--multi_gpu` starts two gloo processes (see CALIBRATION.md)
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines() if x.strip()]


def _no_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, warm_cache):
    root = tmp_path_factory.mktemp("fsdp-e2e")
    cache = warm_cache
    out = {}
    for name in ("ddp", "fsdp"):
        res = subprocess.run([*_launch(name), *_train_args(root / name, cache)],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, failure_report(res)
        out[name] = root / name
    return root, cache, out


@pytest.mark.slow
def test_fsdp_config_shards_on_cpu_and_matches_ddp(runs):
    _, _, out = runs
    m_fsdp = json.loads((out["fsdp"] / schema.MANIFEST).read_text())
    m_ddp = json.loads((out["ddp"] / schema.MANIFEST).read_text())
    assert m_fsdp["status"] == m_ddp["status"] == "done"
    assert (m_fsdp["strategy"], m_fsdp["world_size"], m_fsdp["param_class"]) == \
        ("fsdp2", 2, "DTensor")
    assert (m_ddp["strategy"], m_ddp["world_size"], m_ddp["param_class"]) == \
        ("ddp", 2, "Parameter")
    for m in (m_fsdp, m_ddp):
        assert m["param_dtype"] == m["master_dtype"] == m["optimizer_state_dtype"] == "float32"
        assert m["mixed_precision"] == "no"
    full = m_ddp["param_bytes_per_rank"]
    assert full == 4 * m_ddp["num_parameters"]
    # half per rank, up to FSDP2's padding of odd first dimensions
    assert abs(m_fsdp["param_bytes_per_rank"] - full / 2) <= 0.01 * full

    a, b = _rows(out["ddp"]), _rows(out["fsdp"])
    assert [r["step"] for r in a] == [r["step"] for r in b]
    step1 = [(x, y) for x, y in zip(a, b) if x["step"] == 1][0]
    compared = 0
    for k, va in step1[0].items():
        if k.startswith("time/") or not isinstance(va, float):
            continue
        vb = step1[1][k]
        if k == "actor/behaviour_logp_gap":
            # |learner - sampler| log-prob at step 1 is float noise (~4e-7) on both: compare
            # absolutely
            assert abs(va - vb) < 1e-5
        else:
            # same math, different reduction order (reduce-scatter vs all-reduce)
            assert vb == pytest.approx(va, rel=1e-3, abs=1e-6), k
        compared += 1
    assert compared > 30


@pytest.mark.slow
def test_fsdp_checkpoint_is_dcp_shards_and_the_export_a_full_hf_model(runs):
    """Each rank wrote its own shards (no gather); the end-of-run export is a full HF model."""
    from transformers import AutoModelForCausalLM

    from hapo_cli.learner.dcp_checkpoint import DCP_DIR

    _, _, out = runs
    ck_f = out["fsdp"] / schema.CHECKPOINTS_DIR / f"step-{STEPS:06d}"
    assert sorted(p.name for p in (ck_f / DCP_DIR).iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ex = f"exports/step-{STEPS:06d}"
    mf = AutoModelForCausalLM.from_pretrained(out["fsdp"] / ex, local_files_only=True)
    md = AutoModelForCausalLM.from_pretrained(out["ddp"] / ex, local_files_only=True)
    sf, sd = mf.state_dict(), md.state_dict()
    assert sf.keys() == sd.keys()
    for k in sd:
        assert sf[k].dtype == torch.float32 and sf[k].shape == sd[k].shape
        # 4 steps apart only by reduction order (lr 2e-4 AdamW steps ~2e-4 per entry)
        torch.testing.assert_close(sf[k], sd[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 FSDP2 ranks -> 1 process: DCP reshards model and AdamW state; steps 3-4 then match
    the uninterrupted 2-rank run as DDP matches FSDP2 (same math, another reduction order:
    rel 1e-3, the behaviour log-prob gap absolutely)."""
    _, cache, out = runs
    run = tmp_path / "fsdp-to-1"
    shutil.copytree(out["fsdp"], run, ignore=shutil.ignore_patterns(".hapo.lock"))
    for s in (3, 4):
        shutil.rmtree(run / schema.CHECKPOINTS_DIR / f"step-{s:06d}")
    shutil.rmtree(run / "exports")
    res = subprocess.run([sys.executable, *_train_args(run, cache), "--resume"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, failure_report(res)
    m = json.loads((run / schema.MANIFEST).read_text())
    assert (m["world_size"], m["resumed_from"]) == (1, "step-000002")
    a = {r["step"]: r for r in _rows(out["fsdp"])}
    b = {r["step"]: r for r in _rows(run)}
    assert sorted(a) == sorted(b)
    for step in (3, 4):
        for k, va in a[step].items():
            if k.startswith("time/") or not isinstance(va, float):
                continue
            if k == "actor/behaviour_logp_gap":
                assert abs(va - b[step][k]) < 1e-5
            else:
                assert b[step][k] == pytest.approx(va, rel=1e-3, abs=1e-6), (step, k)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, as a machine failure would. torchrun
    starts each rank in its own session, so killing the launcher's process group alone leaves
    the ranks training on (and a resume would race them)."""
    import psutil

    launcher = psutil.Process(proc.pid)
    procs = [launcher, *launcher.children(recursive=True)]
    assert len(procs) >= 3, procs  # launcher (+ torchrun's agent) and two ranks
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def _kill_at_step_2_and_resume(root: Path, cache: Path, strategy: str, *sets: str) -> Path:
    """Start a run, SIGKILL the launcher and both ranks once checkpoint 2 exists, resume it.
    `sets`: more --set arguments (`log.checkpoint_format=hf`)."""
    killed = root / f"killed-{strategy}{'-'.join(['', *sets])}"
    extra = [a for s in sets for a in ("--set", s)]
    cmd = [*_launch(strategy), *_train_args(killed, cache, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
    deadline = time.time() + 400
    while time.time() < deadline:
        ck = killed / schema.CHECKPOINTS_DIR
        if ck.is_dir() and any(p.name == "step-000002" for p in ck.iterdir()):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _kill_tree(proc)

    assert json.loads((killed / schema.MANIFEST).read_text())["status"] == "running"
    assert max(r["step"] for r in _rows(killed)) < STEPS

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, failure_report(res)
    manifest = json.loads((killed / schema.MANIFEST).read_text())
    assert manifest["status"] == "done" and manifest["resumed_from"] == "step-000002"
    return killed


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_matches_uninterrupted(runs):
    root, cache, out = runs
    killed = _kill_at_step_2_and_resume(root, cache, "fsdp")
    assert _no_times(_rows(killed)) == _no_times(_rows(out["fsdp"]))


ZERO = ["zero2", "zero3"]


@pytest.fixture(scope="module")
def zero_runs(runs):
    """`hapo train` under recipes/accelerate/zero2.yaml and zero3.yaml (ZeRO-3 with the HF
    engine sampling from an unsharded copy)."""
    pytest.importorskip("deepspeed", reason="deepspeed is an extra: pip install -e '.[deepspeed]'")
    root, cache, _ = runs
    out = {}
    for stage in ZERO:
        res = subprocess.run([*_launch(stage), *_train_args(root / stage, cache)],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, failure_report(res)
        out[stage] = root / stage
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ZERO)
def test_zero_run_matches_ddp_and_writes_each_ranks_partition(runs, zero_runs, stage):
    _, _, out = runs
    run = zero_runs[stage]
    m = json.loads((run / schema.MANIFEST).read_text())
    m_ddp = json.loads((out["ddp"] / schema.MANIFEST).read_text())
    assert m["status"] == "done"
    assert (m["strategy"], m["world_size"], m["zero_stage"]) == ("deepspeed", 2, int(stage[-1]))
    full = m_ddp["param_bytes_per_rank"]
    if stage == "zero3":  # half per rank, up to ZeRO-3's padding of each partition
        assert abs(m["param_bytes_per_rank"] - full / 2) <= 0.01 * full
    else:
        assert m["param_bytes_per_rank"] == full
    a, b = _rows(out["ddp"]), _rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        if ra["step"] != 1:
            continue
        for k, va in ra.items():
            if k.startswith("time/") or not isinstance(va, float):
                continue
            if k == "actor/behaviour_logp_gap":
                assert abs(va - rb[k]) < 1e-5  # float noise on both (see the FSDP test)
            else:
                assert rb[k] == pytest.approx(va, rel=1e-3, abs=1e-6), k
            compared += 1
    assert compared > 30
    # DeepSpeed's own per-rank files (log.checkpoint_format=dcp, the default): nothing gathered
    ck = run / schema.CHECKPOINTS_DIR / f"step-{STEPS:06d}"
    names = sorted(p.name for p in ck.iterdir())
    assert json.loads((ck / "trainer_state.json").read_text())["format"] == "zero"
    assert not [n for n in names if n.endswith((".safetensors", ".bin")) or n == "optimizer.pt"]
    assert {"config.json", "zero", "zero_to_fp32.py"} <= set(names)
    zero = sorted(p.name for p in (ck / "zero").iterdir())
    assert [n for n in zero if n.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ZERO)
def test_zero_export_from_partitions_is_the_runs_gathered_model(runs, zero_runs, stage, tmp_path):
    """`hapo export` merges every rank's fp32 partition in one process (no DeepSpeed engine):
    the weights equal, bit for bit, the end-of-run export the run gathered from the live
    engine, and are 4 steps close to DDP's; `hapo evaluate --step` reads the partitions."""
    from safetensors.torch import load_file

    _, _, out = runs
    run = zero_runs[stage]
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", "export", str(run), "--step",
                          str(STEPS), "--out", str(tmp_path / "export")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, failure_report(res)
    mine = load_file(tmp_path / "export" / "model.safetensors")
    gathered = load_file(run / f"exports/step-{STEPS:06d}/model.safetensors")
    ddp = load_file(out["ddp"] / f"exports/step-{STEPS:06d}/model.safetensors")
    assert mine.keys() == gathered.keys() == ddp.keys()
    for k in gathered:
        assert mine[k].dtype == torch.float32 and torch.equal(mine[k], gathered[k]), k
        torch.testing.assert_close(mine[k], ddp[k], rtol=0, atol=2e-5, msg=k)  # as FSDP's test
    if stage == "zero2":
        return  # `hapo evaluate` reads either through the same load: once is enough
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", "evaluate", str(run), "--step",
                          str(STEPS), "--bench", "arith", "--limit", "4", "--n", "1",
                          "--temperature", "1.0", "--name", "zero"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, failure_report(res)
    rows = [json.loads(x) for x in (run / "eval" / "zero.jsonl").read_text().splitlines()]
    assert rows and all(r["checkpoint_step"] == STEPS for r in rows)


@pytest.mark.slow
def test_zero_truncated_partition_falls_back_to_the_previous_checkpoint(zero_runs, tmp_path):
    """A rank's partition cut short on disk: --resume skips that checkpoint, with its reason."""
    from hapo_cli.learner.resume import usable_checkpoint

    run = tmp_path / "run"
    shutil.copytree(zero_runs["zero3"], run)
    last = run / schema.CHECKPOINTS_DIR / f"step-{STEPS:06d}"
    f = last / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt, skipped = usable_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step-{STEPS - 1:06d}"
    assert skipped == [f"{last.name}: zero/{f.name}: cannot be loaded safely (RuntimeError)"], \
        skipped
    f.unlink()
    ckpt, skipped = usable_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step-{STEPS - 1:06d}"
    assert skipped == [f"{last.name}: zero/: no partition of rank 1 (of 2)"], skipped


@pytest.mark.slow
@pytest.mark.parametrize("stage", ZERO)
def test_zero_sigkill_then_resume_matches_uninterrupted(runs, zero_runs, stage):
    """ZeRO-3 in DeepSpeed's per-rank format (the default). ZeRO-2 in the earlier one
    (log.checkpoint_format=hf: the gathered HF folder + each rank's partition, `zero_state.py`),
    which must still resume, to the rows of the uninterrupted run that wrote the per-rank
    format. (ZeRO-2's per-rank save and reload are compared bit for bit in
    tests/test_strategy.py.)"""
    root, cache, _ = runs
    sets = ("log.checkpoint_format=hf",) if stage == "zero2" else ()
    killed = _kill_at_step_2_and_resume(root, cache, stage, *sets)
    ck = killed / schema.CHECKPOINTS_DIR / "step-000002"  # what the resume read
    if stage == "zero2":
        assert (ck / "model.safetensors").is_file()
        assert (ck / "zero-optim-rank00001-of-00002.pt").is_file()
    else:
        assert json.loads((ck / "trainer_state.json").read_text())["format"] == "zero"
    assert _no_times(_rows(killed)) == _no_times(_rows(zero_runs[stage]))


@pytest.mark.slow
def test_zero_checkpoint_refuses_another_world_size_or_strategy(runs, zero_runs):
    """Resuming ZeRO partitions on 1 process (or under DDP) is one line, exit 2, and the run's
    rows and checkpoints stay as they were."""
    root, cache, _ = runs
    run = root / "zero2-copy"
    shutil.copytree(zero_runs["zero2"], run)
    before = (run / schema.METRICS).read_bytes()
    res = subprocess.run([sys.executable, *_train_args(run, cache), "--resume"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-3000:]
    err = [ln for ln in res.stderr.splitlines() if "ZeRO" in ln]
    assert err and "for 2 ranks" in err[-1] and "--num_processes 2" in err[-1], res.stderr[-2000:]
    assert (run / schema.METRICS).read_bytes() == before
    assert sorted(p.name for p in (run / schema.CHECKPOINTS_DIR).iterdir()) == \
        sorted(p.name for p in (zero_runs["zero2"] / schema.CHECKPOINTS_DIR).iterdir())
