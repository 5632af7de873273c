"""`hapo evaluate`: metric formulas by hand, settings parsing, end-to-end temperature sweep."""

from __future__ import annotations

import json
from math import comb

import pytest
from typer.testing import CliRunner

from hapo_cli.cli import app
from hapo_cli.errors import HapoError
from hapo_cli.evaluate import Setting, avg_at_k, maj_at_k, pass_at_k, pass_ks

runner = CliRunner()


def test_pass_at_k_hand_values():
    # n=4, c=1, k=1: 1 - C(3,1)/C(4,1) = 1 - 3/4 = 0.25
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # n - c < k: certain success; c = 0: zero
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0
    # against the binomial definition on a grid
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 4)  # n < k
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_avg_and_maj_hand_values():
    assert avg_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])
    # "7" wins 2 votes to 1, and "7" is correct
    assert maj_at_k(["7", "3", "7", None], [True, False, True, False]) == 1.0
    # "3" wins (2 votes) but is wrong, though one sample was right
    assert maj_at_k(["3", "7", "3"], [False, True, False]) == 0.0
    # tie: first seen wins ("5" before "6")
    assert maj_at_k(["5", "6"], [True, False]) == 1.0
    assert maj_at_k([None, None], [False, False]) == 0.0
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6]


def test_settings_parse():
    s = Setting.parse("0.5, 1.0,adaptive", greedy=True)
    assert [x.label for x in s] == ["T=0.5", "T=1", "adaptive", "greedy"]
    assert s[2].adaptive and s[0].temperature == 0.5
    with pytest.raises(HapoError, match="not a number"):
        Setting.parse("hot", greedy=False)
    with pytest.raises(HapoError, match="> 0"):
        Setting.parse("0", greedy=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("evalrun")
    out = root / "run"
    sets = ["model.warmup.steps=150", f"model.cache_dir={cache_dir}",
            "train.prompts_per_step=4", "train.mini_batch_prompts=2",
            "train.micro_batch_size=8", "rollout.n=4", "eval.at_start=false",
            "eval.limit=4", "eval.n=1", "train.dynamic_sampling.enabled=false"]
    args = ["train", "--recipe", "tiny/hapo", "--max-steps", "2", "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


def _eval(run, *extra):
    return runner.invoke(app, ["evaluate", str(run), "--bench", "arith", "--n", "4",
                               "--limit", "24", "--temperature", "0.5,1.0,1.5,adaptive",
                               "--top-p", "1.0", *extra])


@pytest.mark.slow
def test_temperature_sweep_end_to_end(trained_run):
    res = _eval(trained_run, "--name", "sweep")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (trained_run / "eval" / "sweep.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["T=0.5", "T=1", "T=1.5", "adaptive"]
    for r in rows:
        assert r["benchmark"] == "arith" and r["checkpoint_step"] == 2 and r["n"] == 4
        for key in ("avg@4", "pass@1", "pass@4", "maj@4", "response_len_mean",
                    "truncation_rate", "critical_tokens_mean", "critical_entropy_threshold"):
            assert key in r, key
        assert r["pass@1"] == pytest.approx(r["avg@4"])  # unbiased pass@1 = mean accuracy
        assert r["pass@4"] >= r["pass@1"]
    thresholds = {r["critical_entropy_threshold"] for r in rows}
    assert len(thresholds) == 1  # one threshold for all settings: counts are comparable
    crit = [r["critical_tokens_mean"] for r in rows[:3]]
    assert crit[0] < crit[1] < crit[2]  # hotter sampling visits higher-entropy states
    samples = (trained_run / "eval" / "sweep-samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 24
    # same seed -> identical results
    res = _eval(trained_run, "--name", "again")
    assert res.exit_code == 0
    again = [json.loads(x) for x in (trained_run / "eval" / "again.jsonl").read_text().splitlines()]
    assert again == rows


def test_threads_apply_to_the_evaluation_and_are_restored(trained_run, monkeypatch):
    import torch

    from hapo_cli import evaluate as ev

    seen = []
    inner = ev._sample_models

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return inner(*args, **kwargs)

    monkeypatch.setattr(ev, "_sample_models", spy)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2  # a count that differs from the session's
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", "arith", "--n", "1",
                              "--limit", "4", "--temperature", "1.0", "--threads", str(want),
                              "--name", "threads"])
    assert res.exit_code == 0, res.output
    assert seen == [want] and torch.get_num_threads() == before
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", "arith", "--n", "1",
                              "--limit", "4", "--temperature", "1.0", "--name", "threads",
                              "--overwrite"])
    assert res.exit_code == 0, res.output
    assert seen == [want, before]  # no --threads: torch's own count, untouched


def test_evaluate_errors(tmp_path, trained_run):
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such run directory" in res.output
    res = runner.invoke(app, ["evaluate", str(trained_run), "--checkpoints", "7"])
    assert res.exit_code == 2 and "step 7" in res.output
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", "nosuchbench"])
    assert res.exit_code == 2 and "arith" in res.output  # lists the known names
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}\n{oops\n')
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl" in res.output and "2" in res.output
    # --server-url: only with the server engine, and a URL (before any model is loaded)
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", "arith", "--server-url",
                              "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "--server-url is for --engine vllm-server" in res.output
    res = runner.invoke(app, ["evaluate", str(trained_run), "--bench", "arith", "--engine",
                              "vllm-server", "--server-url", "127.0.0.1:9"])
    assert res.exit_code == 2 and "expected http://HOST:PORT" in res.output
