"""data.rewards: verl- and TRL-style Python reward functions, weights, the worker pool's
timeouts and error counts, and the load-time probe."""

from __future__ import annotations

import math
import sys
import textwrap
import time

import pytest
import torch

from hapo_cli.data import Example
from hapo_cli.errors import HapoError
from hapo_cli.recipe import DataConfig, RecipeError, load_recipe
from hapo_cli.rewards.custom import RewardError, RewardSet, mean_metrics, probe_rewards

VERL_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1 for an exact answer, plus the length as an extra key; 'pred' (a string) is not logged."""
    right = solution_str.strip() == ground_truth
    return {"score": 1.0 if right else -0.5, "length": len(solution_str), "pred": solution_str,
            "acc": right}

def bonus_by_source(data_source, solution_str, ground_truth, extra_info):
    return 0.1 * extra_info.get("level", 0) + (data_source == "geo")

def hangs(data_source, solution_str, ground_truth, extra_info):
    import time
    time.sleep(60)

def raises(data_source, solution_str, ground_truth, extra_info):
    if solution_str == "boom":
        raise ZeroDivisionError("no answer")
    return 1.0

def wrong_signature(text, answer):
    return 1.0

def wrong_shape(data_source, solution_str, ground_truth, extra_info):
    return "high"
'''

TRL_MODULE = '''
def length_penalty(prompts, completions, **kwargs):
    """-0.1 per character over 3; None (no reward) for an empty completion."""
    return [None if not c else -0.1 * max(len(c) - 3, 0) for c in completions]

def uses_column(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]
'''


@pytest.fixture(scope="module")
def funcs(tmp_path_factory):
    """rewards_verl.py (a file) and trl_rewards (a module on sys.path, as `package.module`)."""
    d = tmp_path_factory.mktemp("rewards")
    (d / "rewards_verl.py").write_text(textwrap.dedent(VERL_FILE))
    (d / "trl_rewards.py").write_text(textwrap.dedent(TRL_MODULE))
    sys.path.insert(0, str(d))  # spawned workers inherit sys.path
    yield d
    sys.path.remove(str(d))


def ex(answer: str, source: str = "math", level: int = 0) -> Example:
    row = {"data_source": source, "prompt": "q?", "answer": answer,
           "extra_info": {"level": level}}
    return Example("u", "q?", (1,), answer, "math", None, "t", row)


def cfg(funcs, *rewards, **kw) -> DataConfig:
    return DataConfig(rewards=list(rewards), **kw)


def test_verl_and_trl_weighted_sum_by_hand(funcs):
    f = str(funcs / "rewards_verl.py")
    data = cfg(funcs, {"function": f"{f}:compute_score", "weight": 2.0},
               {"function": f"{f}:bonus_by_source", "weight": 1.0, "name": "bonus"},
               {"function": "trl_rewards:length_penalty", "style": "trl", "weight": 0.5})
    examples = [ex("12"), ex("7", "geo", 3), ex("5")]
    texts = ["12", "seven", ""]
    with RewardSet(data) as rewards:
        out = rewards.score(examples, texts)
    # compute_score: "12"=="12" -> 1; "seven"!="7" -> -0.5; ""!="5" -> -0.5
    # bonus: 0; 0.1*3 + 1 = 1.3; 0
    # length_penalty: len 2 -> -0.0; len 5 -> -0.2; empty -> None (counts 0)
    # total = 2*score + bonus + 0.5*length
    #       = 2*1 + 0 + 0 = 2;  2*(-0.5) + 1.3 + 0.5*(-0.2) = 0.2;  2*(-0.5) + 0 + 0 = -1
    torch.testing.assert_close(out.total, torch.tensor([2.0, 0.2, -1.0]))
    torch.testing.assert_close(out.acc, torch.tensor([1.0, 0.0, 0.0]))  # compute_score's acc key
    torch.testing.assert_close(out.parts["reward/compute_score/mean"],
                               torch.tensor([1.0, -0.5, -0.5]))
    torch.testing.assert_close(out.parts["reward/compute_score/length"],
                               torch.tensor([2.0, 5.0, 0.0]))
    assert "reward/compute_score/pred" not in out.parts
    torch.testing.assert_close(out.parts["reward/bonus/mean"], torch.tensor([0.0, 1.3, 0.0]))
    pen = out.parts["reward/length_penalty/mean"]
    torch.testing.assert_close(pen[:2], torch.tensor([0.0, -0.2]))
    assert math.isnan(pen[2])
    assert out.errors == {f"reward/{n}/errors": 0
                          for n in ("compute_score", "bonus", "length_penalty")}
    logged = mean_metrics([out.parts], [out.errors])
    assert logged["reward/length_penalty/mean"] == pytest.approx(-0.1)  # mean of 0, -0.2 (None out)
    assert logged["reward/compute_score/mean"] == pytest.approx(0.0)  # (1 - 0.5 - 0.5) / 3


def test_builtin_and_trl_columns(funcs):
    data = cfg(funcs, {"function": "exact", "weight": 1.0},
               {"function": "trl_rewards:uses_column", "style": "trl", "weight": 0.25})
    examples = [ex("66"), ex("5")]
    with RewardSet(data, incorrect_score=-1.0) as rewards:
        out = rewards.score(examples, ["1+2=3;#66", "5"])
    # exact: right -> 1, "5" has no '#' -> incorrect_score -1; uses_column: "5"=="5" -> 1
    torch.testing.assert_close(out.total, torch.tensor([1.0, -1.0 + 0.25]))
    torch.testing.assert_close(out.acc, torch.tensor([1.0, 0.0]))  # the built-in grader's


def test_hanging_call_costs_its_timeout_and_is_counted(funcs):
    f = str(funcs / "rewards_verl.py")
    data = cfg(funcs, {"function": f"{f}:hangs"}, {"function": f"{f}:raises", "weight": 10.0},
               reward_timeout=0.5, reward_on_error=-3.0)
    with RewardSet(data) as rewards:
        t0 = time.monotonic()
        out = rewards.score([ex("1"), ex("1")], ["a", "boom"])
        took = time.monotonic() - t0
    # two hanging calls, 0.5 s each (plus a worker restart each); raises: 1 then on_error
    assert took >= 1.0
    # total = hangs (-3) + 10 * raises: -3 + 10*1 = 7; -3 + 10*(-3) = -33
    torch.testing.assert_close(out.total, torch.tensor([7.0, -33.0]))
    assert out.errors == {"reward/hangs/errors": 2, "reward/raises/errors": 1}


def test_reward_errors_raise(funcs):
    f = str(funcs / "rewards_verl.py")
    data = cfg(funcs, {"function": f"{f}:raises"}, reward_errors="raise")
    with RewardSet(data) as rewards, pytest.raises(RewardError, match="ZeroDivisionError"):
        rewards.score([ex("1")], ["boom"])


@pytest.mark.parametrize("name, style, match", [
    ("wrong_signature", "verl", "cannot be called as verl-style"),
    ("compute_score", "trl", "cannot be called as trl-style"),
    ("wrong_shape", "verl", "returned|expected a number"),
    ("nothing_here", "verl", "cannot be loaded .*no attribute 'nothing_here'"),
])
def test_probe_names_the_function(funcs, name, style, match):
    f = str(funcs / "rewards_verl.py")
    data = cfg(funcs, {"function": f"{f}:{name}", "style": style}, source="synthetic")
    with pytest.raises(RewardError, match=match) as err:
        probe_rewards(data)
    assert f"data.rewards[0].function='{f}:{name}'" in str(err.value)
    assert isinstance(err.value, HapoError)


def test_recipe_checks_reward_names(tmp_path):
    with pytest.raises(RecipeError, match="no such file: missing.py"):
        load_recipe(None, ["data.rewards=[{function: 'missing.py:f'}]"])
    with pytest.raises(RecipeError, match="not a reward function"):
        load_recipe(None, ["data.rewards=[{function: fuzzy}]"])
    with pytest.raises(RecipeError, match="two rewards are named 'math'"):
        load_recipe(None, ["data.rewards=[{function: math}, {function: math}]"])
    r = load_recipe("tiny/dapo", ["data.rewards=[{function: arith, weight: 2}]"])
    assert r.data.rewards[0].builtin == "exact" and r.data.rewards[0].label == "arith"


def test_wrong_signature_is_exit_2_at_load(funcs, tmp_path):
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    f = funcs / "rewards_verl.py"
    res = CliRunner().invoke(app, [
        "train", "--recipe", "tiny/dapo", "--output", str(tmp_path / "run"),
        "--set", f"data.rewards=[{{function: '{f}:wrong_signature'}}]",
        "--set", f"model.cache_dir={tmp_path / 'cache'}",
    ])
    assert res.exit_code == 2, res.output
    assert "wrong_signature" in res.output and "cannot be called as verl-style" in res.output
    assert not (tmp_path / "cache").exists()  # refused before any model was built
