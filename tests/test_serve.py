"""`hapo serve` and the vllm-server engine without vLLM: the server command, the process owner
(no orphan after its owner is SIGKILLed), the reply parsing and the prompt split. The real
servers are tested in tests_vllm/test_server.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hapo_cli.rollout.base import SamplingSpec
from hapo_cli.rollout.server import ServerClient, ServerError, reply_as_output, split_evenly
from hapo_cli.rollout.vllm import parse_outputs
from hapo_cli.serve import parse_extra, server_command
from hapo_cli.serve.process import ServerProcess, live_members, stop_leftovers


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_gone(pids: list[int], timeout_s: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_server_command_cpu_build():
    argv, env, url = server_command("/m", "127.0.0.1", 8011, {"max_num_seqs": "8",
                                    "enable-prefix-caching": "false"}, cpu=True)
    assert url == "http://127.0.0.1:8011" and env == {"VLLM_SERVER_DEV_MODE": "1"}
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    opts = " ".join(argv)
    assert "--logprobs-mode processed_logprobs" in opts and "--enable-scale-out" in opts
    assert "vllm_plugin:HapoAdaptiveTemperatureV1" in opts and "--enforce-eager" in opts
    assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {"backend": "hapo_gloo"}
    assert "--max-num-seqs 8" in opts and "enable-prefix-caching" not in opts
    gpu, _, _ = server_command("/m", "10.0.0.2", 1, {}, cpu=False)
    assert json.loads(gpu[gpu.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    assert "vllm_plugin:HapoAdaptiveTemperature" in " ".join(gpu) and "--enforce-eager" not in gpu


def test_parse_extra():
    assert parse_extra(["max-num-seqs=4", "enable-prefix-caching"]) == {
        "max-num-seqs": "4", "enable-prefix-caching": "true"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_extra(["=3"])


def test_split_evenly():
    assert [list(r) for r in split_evenly(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in split_evenly(2, 3)] == [1, 1, 0]


def test_reply_parsed_like_a_request_output():
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=3)
    reply = {"choices": [
        {"index": 1, "token_ids": [7], "finish_reason": "stop",
         "logprobs": {"content": [{"token_id": 7, "logprob": -0.5}]}},
        {"index": 0, "token_ids": [4, 5, 6], "finish_reason": "length",
         "logprobs": {"content": [{"token_id": t, "logprob": -1.0} for t in (4, 5, 6)]}},
    ]}
    batch = parse_outputs([reply_as_output(reply, "u")], 1, spec, pad_token_id=0)
    assert batch.response_ids.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch.finish_reason == ["length", "eos"]
    assert batch.behaviour_logp[1].tolist() == [-0.5, 0.0, 0.0]
    aborted = {"choices": [{"index": 0, "token_ids": [], "finish_reason": "abort",
                            "logprobs": {"content": []}}]}
    with pytest.raises(ServerError, match="vLLM server u stopped answering"):
        reply_as_output(aborted, "u")
    with pytest.raises(ServerError, match="log-probs for"):
        reply_as_output({"choices": [{"index": 0, "token_ids": [1], "logprobs": None}]}, "u")


def test_unreachable_url_is_one_line_within_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"http://127.0.0.1:9 unreachable after 1 s"):
        ServerClient("http://127.0.0.1:9", 5).wait_up(1.0)
    assert time.monotonic() - t0 < 10


def test_stop_ends_the_whole_group(tmp_path):
    # a "server" that starts a grandchild: both must go
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    pid_file = tmp_path / "servers.pid"
    with ServerProcess([sys.executable, "-c", script], {}, "http://x", pid_file=pid_file,
                       grace_s=2) as server:
        time.sleep(1.5)
        group = [int(p) for p in subprocess.check_output(
            ["pgrep", "-g", str(server.pgid)], text=True).split()]
        assert len(group) >= 3  # guard, python, sleep
        assert json.loads(pid_file.read_text())["pgid"] == server.pgid
    assert wait_gone(group) == []


def test_no_orphan_after_the_owner_is_sigkilled(tmp_path):
    """The owner dies without running any `finally`: the guard sees its pipe close and ends
    the group."""
    owner = tmp_path / "owner.py"
    owner.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from hapo_cli.serve.process import ServerProcess
        s = ServerProcess([sys.executable, "-c", "import time; time.sleep(300)"], {{}}, "u",
                          pid_file=Path({str(tmp_path / 'servers.pid')!r}), grace_s=2).start()
        print(s.pgid, flush=True)
        time.sleep(300)
    """))
    proc = subprocess.Popen([sys.executable, str(owner)], stdout=subprocess.PIPE, text=True)
    pgid = int(proc.stdout.readline())
    time.sleep(1.0)
    group = [int(p) for p in subprocess.check_output(["pgrep", "-g", str(pgid)], text=True).split()]
    assert len(group) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_gone(group) == []
    assert stop_leftovers(tmp_path / "servers.pid") == 0  # nothing left to stop
    assert not (tmp_path / "servers.pid").exists()


def test_live_members_lists_a_groups_running_processes_but_not_its_zombies():
    """`live_members` (what `ServerProcess.stop` waits on): a running member of a new session
    is listed; once SIGKILLed and not yet reaped (a zombie) it is not; another group's process
    never is."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert live_members(proc.pid) == [proc.pid]
        assert proc.pid not in live_members(os.getpgrp())
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        state = ""
        while time.monotonic() < deadline and state != "Z":  # not waited on: a zombie
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            time.sleep(0.05)
        assert state == "Z"
        assert live_members(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
