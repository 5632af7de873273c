"""`rollout.engine: vllm-server` against real vLLM servers of the CPU build (`hapo serve`'s command
under `ServerProcess`), end to end through the CLI where a user would go through it.

Servers cost ~30 s to start on a quiet machine (minutes on a loaded one), so they are few and
module-scoped: `run_local` starts its own (rollout.server.urls empty, the local-server path);
`servers` holds two of the tiny warm-up policy and one of an untied random model for the engine
tests and the runs that name URLs; every later run pushes its weights before its first rollout,
so a server is reused across runs. Every fixture stops what it started. Tests run in file order:
the server killed mid-run is the last user of its fixture.

`actor/behaviour_logp_gap` (see test_train_vllm.py): mean |server's log-prob - learner's| over a
step's tokens; with A off, ~5e-7 when the server has the learner's weights. Bar: 1e-5."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_policy, tiny_policy
from rows import assert_same_rows  # tests/rows.py (tests_vllm/conftest.py)

from analysis import schema
from hapo_cli.rollout.base import SamplingSpec
from hapo_cli.sections import ServerConfig, VllmConfig
from hapo_cli.serve import ServerProcess, server_command
from hapo_cli.serve.process import live_members

ROOT = Path(__file__).resolve().parent.parent
GAP = "actor/behaviour_logp_gap"
SMALL = [
    "model.warmup.steps=150", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
    "train.micro_batch_size=8", "rollout.n=4", "eval.limit=8", "eval.n=2", "eval.every=2",
    "train.dynamic_sampling.enabled=false", "log.checkpoint_every=2",
]


def train_cmd(out: Path, cache: Path, *extra: str, steps: int = 4) -> list[str]:
    args = [sys.executable, "-m", "hapo_cli.cli", "train", "--recipe", "tiny/dapo",
            "--max-steps", str(steps), "--output", str(out)]
    for s in [*SMALL, f"model.cache_dir={cache}", "rollout.engine=vllm-server", *extra]:
        args += ["--set", s]
    return args


def hapo_train(out: Path, cache: Path, *extra: str, steps: int = 4, ok: bool = True,
               timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(train_cmd(out, cache, *extra, steps=steps), capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    if ok:
        assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-3000:]
    return res


def urls(*servers: ServerProcess) -> str:
    return "rollout.server.urls=" + json.dumps([s.url for s in servers])


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines() if x.strip()]


def trained(run: Path) -> list[dict]:
    return [r for r in rows(run) if r["step"] > 0 and not r.get("skipped")]


def group_members(pgid: int) -> list[int]:
    """The live processes of group `pgid` (zombies hold nothing: `live_members`, tested in
    tests/test_serve.py against real processes)."""
    return live_members(pgid)


def recorded_groups(run: Path) -> list[int]:
    path = run / "servers.pid"
    return [json.loads(x)["pgid"] for x in path.read_text().splitlines()] if path.exists() else []


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run_local(tmp_path_factory, cache) -> Path:
    """tiny/dapo on one local server that `hapo train` starts and stops; 4 steps,
    checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "local"
    hapo_train(out, cache)
    return out


def start(model: Path, log: Path) -> ServerProcess:
    from hapo_cli.rollout.server_local import free_port

    argv, env, url = server_command(str(model), "127.0.0.1", free_port(), {}, dtype="float32",
                                    max_model_len=256)
    return ServerProcess(argv, env, url, log_path=log, grace_s=5).start()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, cache, run_local):
    """Two servers of the warm-up policy and one of an untied random model, started together."""
    warm = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("warmup-"))
    untied = save_policy(*tiny_policy(tied=False), tmp_path_factory.mktemp("untied"))
    logs = tmp_path_factory.mktemp("logs")
    up = [start(warm, logs / "a.log"), start(warm, logs / "b.log"), start(untied, logs / "c.log")]
    try:
        for s in up:
            s.wait_ready(900)
        yield {"a": up[0], "b": up[1], "untied": up[2], "warm": warm, "untied_path": untied}
    finally:
        for s in up:
            s.stop()


# ---------------------------------------------------------------------------------------------
# local servers, pushes, two servers, resume
# ---------------------------------------------------------------------------------------------


def test_gap_after_every_push_with_a_local_server(run_local):
    steps = trained(run_local)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r[GAP] < 1e-5, (r["step"], r[GAP])
        assert r["actor/grad_norm"] > 0  # the learner moved between pushes
    manifest = json.loads((run_local / schema.MANIFEST).read_text())
    assert manifest["status"] == "done"
    groups = recorded_groups(run_local)
    assert len(groups) == 1 and not any(group_members(g) for g in groups)  # stopped at the end


def test_two_servers_split_prompts_and_match_one(tmp_path, cache, run_local, servers):
    """Same seeds, prompts split across two servers (and servers started from the warm-up
    policy, pushed before step 1): the same metrics as the local single-server run."""
    two = tmp_path / "two"
    hapo_train(two, cache, urls(servers["a"], servers["b"]))
    # the same computation from the same fp32 weights: float noise only
    assert_same_rows(rows(run_local), rows(two), rel=1e-6, abs=1e-7)
    assert all(r[GAP] < 1e-5 for r in trained(two))


def test_two_process_fsdp2_learner_with_one_server(tmp_path, cache, run_local, servers):
    """A 2-process FSDP2 learner: both ranks gather (DTensor full_tensor), rank 0 alone sends;
    the same metrics as the 1-process run up to DDP's summation order (as test_train_vllm)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed next to the interpreter"
    two = tmp_path / "fsdp"
    cmd = train_cmd(two, cache, urls(servers["a"]))
    res = subprocess.run([accelerate, "launch", "--config_file", "recipes/accelerate/fsdp.yaml",
                          "--num_processes", "2", "--mixed_precision", "no", *cmd[1:]],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((two / schema.MANIFEST).read_text())["strategy"] == "fsdp2"
    a, b = rows(run_local), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if isinstance(v, float) and not k.startswith("time/"):
                assert rb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (ra["step"], k)
    assert all(r[GAP] < 1e-5 for r in trained(two))


def test_resume_pushes_the_checkpoint_before_the_first_rollout(tmp_path, cache, run_local,
                                                               servers):
    """Server a holds whatever the last run pushed (run two's step-4 weights): a resume from
    step 2 must push checkpoint 2 first, and then steps 3-4 equal the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run_local, resumed)
    shutil.rmtree(resumed / schema.CHECKPOINTS_DIR / "step-000004")
    res = subprocess.run([*train_cmd(resumed, cache, urls(servers["a"])), "--resume"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    step3 = next(r for r in rows(resumed) if r["step"] == 3)
    assert step3[GAP] < 1e-5, step3[GAP]
    assert_same_rows(rows(run_local), rows(resumed), rel=1e-6, abs=1e-7)  # as above


# ---------------------------------------------------------------------------------------------
# engine level: gap after every push (tied, untied; gloo and path), A server-side
# ---------------------------------------------------------------------------------------------


def hf_logp(model, prompts, batch, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T)[y] of every valid response token, (B, T), 0 on padding."""
    out = torch.zeros_like(batch.behaviour_logp)
    for i in range(len(batch)):
        p = prompts[int(batch.prompt_index[i])]
        r = batch.response_ids[i, : int(batch.response_len[i])].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1: -1].float()
        out[i, : len(r)] = torch.log_softmax(logits / temperature, -1).gather(
            -1, torch.tensor(r)[:, None])[:, 0]
    return out


@pytest.mark.parametrize("which", ["warm", "untied"])
def test_gap_after_every_push_tied_and_untied(servers, which):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hapo_cli.rollout.server import VLLMServerEngine

    server = servers["a" if which == "warm" else "untied"]
    path = servers["warm" if which == "warm" else "untied_path"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == (which == "warm")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=16)
    torch.manual_seed(0)
    for k, transfer in enumerate(["gloo", "gloo", "path", "gloo"]):
        cfg = ServerConfig(urls=[server.url], weight_transfer=transfer,
                           path=str(path.parent / f"push-{which}"))
        engine = VLLMServerEngine(cfg, cfg.urls, tok)
        engine.check_model(model)
        with torch.no_grad():  # a real change everywhere, the head (or tied embedding) included
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.sync_from(model)
        batch = engine.generate(prompts, spec, None, seed=k)
        gap = (hf_logp(model, prompts, batch) - batch.behaviour_logp)[batch.response_mask]
        assert gap.abs().max().item() < 1e-5, (which, k, transfer, gap.abs().max().item())


def test_adaptive_temperature_server_side_equals_colocated(servers):
    """Component A in the server's logits processor (nested extra_args through
    /inference/v1/generate) samples what the colocated engine's does: same tokens, same
    processed log-probs (= log_softmax(logits / T_t)), so the same T_t."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hapo_cli.algo import EntropyStats
    from hapo_cli.rollout.server import VLLMServerEngine
    from hapo_cli.rollout.vllm import VLLMEngine

    warm = servers["warm"]
    model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(warm)
    cfg = ServerConfig(urls=[servers["b"].url])
    remote = VLLMServerEngine(cfg, cfg.urls, tok)
    remote.sync_from(model)  # whatever an earlier test pushed, back to the warm-up weights
    local = VLLMEngine(str(warm), VllmConfig(), max_model_len=256, dtype="float32")
    stats = EntropyStats(rho=-0.5, std=1.2, scale_pos=1.5, scale_neg=2.0)
    spec = SamplingSpec(n=4, temperature=0.9, max_new_tokens=16, adaptive=True, tau=0.5)
    prompts = [tok.encode("12+7=") or [5, 6], [9, 10, 11, 12]]
    a = remote.generate(prompts, spec, stats, seed=11)
    b = local.generate(prompts, spec, stats, seed=11)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp)
    plain = remote.generate(prompts, SamplingSpec(n=4, temperature=0.9, max_new_tokens=16),
                            None, seed=11)
    assert not torch.equal(plain.behaviour_logp, a.behaviour_logp)  # A really acted


# ---------------------------------------------------------------------------------------------
# model.lora: merged weights pushed; hapo evaluate on servers
# ---------------------------------------------------------------------------------------------

LORA = ["model.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}",
        "train.lr=1e-3"]


def test_lora_merged_weights_reach_a_server_after_every_push(tmp_path, cache, servers):
    """model.lora: every push sends W + (alpha/r) B A under the base names, never lora_A/B
    (a server would refuse unknown names); the server then samples what the adapted learner
    computes (gap ~5e-7, as full training)."""
    out = tmp_path / "lora"
    hapo_train(out, cache, urls(servers["a"]), *LORA)
    steps = trained(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r[GAP] < 1e-5, (r["step"], r[GAP])
        assert r["actor/grad_norm"] > 0


def evaluate_cmd(run: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hapo_cli.cli", "evaluate", str(run), "--bench", "arith",
            "--n", "2", "--limit", "8", "--temperature", "1.0", "--greedy", "--name", name,
            *extra]


def eval_rows(run: Path, name: str) -> tuple[list[dict], list[dict]]:
    folder = run / schema.EVAL_DIR
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    return read(folder / f"{name}.jsonl"), read(folder / f"{name}-samples.jsonl")


def test_evaluate_on_servers_equals_colocated(run_local, servers):
    """`hapo evaluate --engine vllm-server`, on a local server it starts (the run's
    rollout.server.urls is empty) and on server a (--server-url; it holds another run's
    weights until evaluate pushes the checkpoint's): the same samples and numbers as the
    colocated engine with the same seeds; the local server is gone afterwards."""
    colo = subprocess.run(evaluate_cmd(run_local, "colocated", "--engine", "vllm"),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert colo.returncode == 0, colo.stderr[-3000:]
    pid_file = run_local / schema.EVAL_DIR / ".local-servers" / "servers.pid"
    proc = subprocess.Popen(evaluate_cmd(run_local, "local", "--engine", "vllm-server"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(pid_file.is_file, 300, "the evaluation's local server")
        pgid = json.loads(pid_file.read_text().splitlines()[0])["pgid"]
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    wait_until(lambda: not group_members(pgid), 60, f"process group {pgid} to end")
    assert not pid_file.parent.exists()  # a success leaves no server logs behind
    remote = subprocess.run(evaluate_cmd(run_local, "remote", "--engine", "vllm-server",
                                         "--server-url", servers["a"].url),
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert remote.returncode == 0, remote.stderr[-3000:]
    want, want_samples = eval_rows(run_local, "colocated")
    assert [r["setting"] for r in want] == ["T=1", "greedy"]
    for name in ("local", "remote"):
        got, got_samples = eval_rows(run_local, name)
        assert [s["responses"] for s in got_samples] == [s["responses"] for s in want_samples]
        for a, b in zip(want, got, strict=True):
            assert b["engine"] == "vllm-server"
            for k, v in a.items():
                if k == "engine":
                    continue
                exact = k.startswith(("avg@", "pass@", "maj@")) or k in (
                    "response_len_mean", "truncation_rate")
                if isinstance(v, float) and not exact:
                    # entropies (critical tokens, T_t) from the HF scorer in another process:
                    # the same computation, up to fp32 summation order
                    assert b[k] == pytest.approx(v, rel=1e-6), (name, a["setting"], k)
                else:  # same tokens: accuracy and lengths equal exactly
                    assert b[k] == v, (name, a["setting"], k)
    assert servers["a"].alive()  # a server evaluate did not start is left running


def test_no_orphan_when_evaluate_is_stopped_while_its_server_starts(run_local):
    """Ctrl-C while `hapo evaluate --engine vllm-server` waits for its local server: exit 130
    and nothing of the server left."""
    pid_file = run_local / schema.EVAL_DIR / ".stopped-servers" / "servers.pid"
    proc = subprocess.Popen(evaluate_cmd(run_local, "stopped", "--engine", "vllm-server"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: pid_file.is_file() and group_members(
            json.loads(pid_file.read_text().splitlines()[0])["pgid"]), 300, "the server's group")
        pgid = json.loads(pid_file.read_text().splitlines()[0])["pgid"]
        time.sleep(3)  # the server is importing vLLM or loading the model
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not group_members(pgid), 60, f"process group {pgid} to end")
    assert proc.returncode == 130
    assert not (run_local / schema.EVAL_DIR / "stopped.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# faults and processes
# ---------------------------------------------------------------------------------------------


def test_a_server_of_another_model_is_one_line_before_step_1(tmp_path, cache, servers):
    out = tmp_path / "other"
    res = hapo_train(out, cache, urls(servers["untied"]), ok=False)
    assert res.returncode == 2
    assert f"vLLM server {servers['untied'].url} serves another model" in res.stderr
    assert len(res.stderr.strip().splitlines()[-1]) < 300 and "Traceback" not in res.stderr
    assert not (out / schema.METRICS).exists() or trained(out) == []


def test_unreachable_url_is_one_line_in_bounded_time(tmp_path, cache, run_local):
    t0 = time.monotonic()
    res = hapo_train(tmp_path / "nowhere", cache, 'rollout.server.urls=["http://127.0.0.1:9"]',
                     "rollout.server.connect_timeout_s=3", ok=False, timeout=300)
    assert res.returncode == 2 and "http://127.0.0.1:9 unreachable after 3 s" in res.stderr
    assert "Traceback" not in res.stderr and time.monotonic() - t0 < 300


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_orphan_when_train_is_stopped_while_its_server_starts(tmp_path, cache, run_local,
                                                                 sig):
    """Ctrl-C (the CLI's own clean-up) or SIGKILL (no clean-up at all: the guard's pipe
    closes) while `hapo train` waits for its local server: nothing of the server is left."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(out, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: recorded_groups(out) and group_members(recorded_groups(out)[0]),
                   300, "the local server's process group")
        pgid = recorded_groups(out)[0]
        time.sleep(3)  # the server is importing vLLM or loading the model
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not group_members(pgid), 60, f"process group {pgid} to end")
    if sig == signal.SIGINT:
        assert proc.returncode == 130


def test_server_killed_mid_run_fails_in_one_line_and_resume_continues(tmp_path, cache, servers):
    """Server b dies after step 2's checkpoint: one line naming its URL, the run `failed`,
    checkpoint 2 intact; --resume with another server finishes the run."""
    out = tmp_path / "killed"
    victim = servers["b"]
    proc = subprocess.Popen(train_cmd(out, cache, urls(victim), steps=6),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ckpt = out / schema.CHECKPOINTS_DIR / "step-000002"
        wait_until(lambda: ckpt.is_dir() and any(r["step"] == 3 for r in (
            rows(out) if (out / schema.METRICS).exists() else [])), 600, "step 3")
        victim.stop()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    # shutting down, vLLM aborts what is in flight, or its engine core dies first (500)
    assert last.startswith(f"error: vLLM server {victim.url} ") and (
        "stopped answering" in last or "failed (" in last), err[-2000:]
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["status"] == "failed" and victim.url in manifest.get("message", last)
    assert ckpt.is_dir()
    res = subprocess.run([*train_cmd(out, cache, urls(servers["a"]), steps=6), "--resume"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in trained(out)][-1] == 6
    assert all(r[GAP] < 1e-5 for r in trained(out))

