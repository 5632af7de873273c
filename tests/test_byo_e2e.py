"""Bring your own reward / prompt, seen in the run directory: a tiny run on a local model whose
tokenizer has a chat template, with data.system_prompt, data.prompt_template,
data.chat_template_kwargs and a verl-style reward file. Each sample's first token row holds the
rendered prompt exactly as the model saw it; the per-reward keys (reward/<name>/mean, /errors,
the function's extra keys) are declared by analysis.schema, and `hapo analyze` reports them."""

from __future__ import annotations

import json
import math
import textwrap

import pandas as pd
import pytest
import torch
from conftest import read_metrics

from analysis import schema

# role=content; per message, then the generation prompt, and 'nothink' when enable_thinking is
# false (as Qwen3's template), in the tiny tokenizer's alphabet (test_data_sources.TEMPLATE)
TEMPLATE = ("{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}assistant="
            "{% if enable_thinking is defined and not enable_thinking %}nothink {% endif %}")

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A length-shaped score, len / 16, and the length itself as an extra key."""
    return {"score": len(solution_str) / 16, "chars": float(len(solution_str))}
'''


def test_reward_keys_are_declared_and_parsed():
    assert schema.reward_metric("len_bonus") == "reward/len_bonus/mean"
    assert schema.reward_metric("len_bonus", "errors") == "reward/len_bonus/errors"
    assert schema.parse_reward_metric("reward/len_bonus/chars") == ("len_bonus", "chars")
    # a verl function's key may itself hold '/': the name is the middle segment
    assert schema.parse_reward_metric("reward/f/a/b") == ("f", "a/b")
    for fixed in (schema.REWARD_MEAN, schema.REWARD_ACC, schema.REWARD_ALL_MEAN, "val/x/greedy"):
        assert schema.parse_reward_metric(fixed) is None
    assert schema.is_declared_metric("reward/f/errors") and schema.is_declared_metric("reward/mean")
    assert not schema.is_declared_metric("reward/f") and not schema.is_declared_metric("foo/bar")
    with pytest.raises(ValueError, match="without '/'"):
        schema.reward_metric("a/b")


RESERVED = '''
def clash(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0, "mean": 7.0, "errors": 3.0, "": 5.0, "n/a": 2.0}
'''


def test_a_verl_functions_own_mean_or_errors_key_does_not_overwrite(tmp_path):
    from hapo_cli.data import Example
    from hapo_cli.recipe import DataConfig
    from hapo_cli.rewards.custom import RewardSet

    (tmp_path / "clash.py").write_text(textwrap.dedent(RESERVED))
    data = DataConfig(rewards=[{"function": f"{tmp_path / 'clash.py'}:clash"}])
    example = Example("u", "q?", (1,), "1", "math", None, "t", {"prompt": "q?"})
    with RewardSet(data) as rewards:
        out = rewards.score([example], ["x"])
    assert sorted(out.parts) == ["reward/clash/mean", "reward/clash/n/a",
                                 "reward/clash/returned_errors", "reward/clash/returned_mean"]
    assert float(out.parts["reward/clash/mean"][0]) == 1.0  # the score, not the returned 7
    assert float(out.parts["reward/clash/returned_mean"][0]) == 7.0
    assert out.errors == {"reward/clash/errors": 0}  # the failed calls, not the returned 3
    assert all(schema.is_declared_metric(k) for k in [*out.parts, *out.errors])


def test_a_reward_name_with_a_slash_is_a_recipe_error():
    from hapo_cli.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="data.rewards.*name.*without '/'"):
        load_recipe("tiny/dapo", ["data.rewards=[{function: arith, name: a/b}]"])


def test_reward_table_hand_computed():
    from analysis.tables import reward_table

    m = pd.DataFrame({
        "run": ["r", "r", "r"], "step": [1, 2, 3],
        "reward/f/mean": [0.5, 0.25, math.nan],  # step 3: no value (e.g. every call failed)
        "reward/f/errors": [0.0, 1.0, 4.0],
        "reward/f/chars": [10.0, 20.0, 30.0],
        "reward/mean": [1.0, 1.0, 1.0],  # fixed key: not a reward of data.rewards
    })
    t = reward_table(m)
    assert t.to_dict("records") == [{"run": "r", "reward": "f", "mean": 0.375, "last": 0.25,
                                     "errors": 5.0, "chars": 20.0}]
    assert len(reward_table(m.drop(columns=["reward/f/mean", "reward/f/errors",
                                            "reward/f/chars"]))) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One step of tiny/dapo on a local tiny model (random weights, a chat template)."""
    from typer.testing import CliRunner

    from hapo_cli.cli import app
    from hapo_cli.models import build_tiny_model, build_tokenizer
    from hapo_cli.recipe import TinyModelConfig

    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    model = build_tiny_model(TinyModelConfig(), tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "len_bonus.py").write_text(textwrap.dedent(REWARD))
    out = root / "run"
    sets = [
        "model.init=pretrained", f"model.path={root / 'model'}", "train.prompts_per_step=4",
        "train.mini_batch_prompts=4", "rollout.n=2", "rollout.max_new_tokens=12",
        "eval.every=0", "eval.at_start=false", "train.dynamic_sampling.enabled=false",
        "train.overlong.enabled=false",  # the score is the rewards' weighted sum only
        "log.token_sample_every=1", "log.token_sample_responses=8", "log.checkpoint_every=0",
        # spaces: the tiny character tokenizer reloaded from the model folder keeps them (as
        # transformers' Qwen2Tokenizer it dropped them: 'be brief' became 'bebrief')
        "data.system_prompt=be brief", "data.prompt_template={prompt}, answer #",
        "data.chat_template_kwargs={enable_thinking: false}",
        f"data.rewards=[{{function: arith}}, {{function: '{root / 'len_bonus.py'}:compute_score',"
        " weight: 0.5, name: len_bonus}]",
    ]
    args = ["train", "--recipe", "tiny/dapo", "--max-steps", "1", "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_first_token_rows_hold_the_rendered_prompt(run):
    tokens = pd.read_parquet(run / schema.tokens_file(1))
    assert schema.TOKEN_PROMPT in tokens.columns
    first = tokens.groupby("sample").head(1)  # each sample's first row
    assert len(first) == 8 and first[schema.TOKEN_PROMPT].notna().all()
    assert tokens[schema.TOKEN_PROMPT].notna().sum() == 8  # on the first row only
    for prompt in first[schema.TOKEN_PROMPT]:
        # system_prompt as a system message, prompt_template around the task's prompt,
        # enable_thinking=false through the chat template, exactly as the model read it
        assert prompt.startswith("system=be brief;user=") and prompt.endswith(
            ", answer #;assistant=nothink "), prompt
    # two samples of a group share their prompt (rollout.n=2: samples 2g and 2g+1)
    by_sample = dict(zip(first["sample"], first[schema.TOKEN_PROMPT]))
    pairs = [(s, s ^ 1) for s in by_sample if s % 2 == 0 and s + 1 in by_sample]
    assert all(by_sample[a] == by_sample[b] for a, b in pairs)


@pytest.mark.slow
def test_reward_keys_are_declared_and_analyze_reports_them(run, tmp_path):
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    rows = [r for r in read_metrics(run) if r["step"] == 1]
    keys = {k for r in rows for k in r}
    assert {"reward/arith/mean", "reward/len_bonus/mean", "reward/len_bonus/errors",
            "reward/len_bonus/chars"} <= keys  # (a built-in grader bounds its own time: no errors)
    assert {k for k in keys if not schema.is_declared_metric(k)} == set()
    row = {k: v for r in rows for k, v in r.items()}
    # score = arith + 0.5 x len_bonus, averaged over the 8 responses (float32 sums)
    assert row["reward/mean"] == pytest.approx(
        row["reward/arith/mean"] + 0.5 * row["reward/len_bonus/mean"], abs=1e-6)
    # len_bonus = len / 16 per response, so its mean is the mean length (the extra key) / 16
    assert row["reward/len_bonus/mean"] == pytest.approx(row["reward/len_bonus/chars"] / 16,
                                                         abs=1e-6)
    assert row["reward/len_bonus/chars"] > 0 and row["reward/len_bonus/errors"] == 0

    out = tmp_path / "analysis"
    res = CliRunner().invoke(app, ["analyze", str(run), "--out", str(out), "--format", "png"])
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    assert "## Rewards (data.rewards)" in report
    table = report.split("## Rewards (data.rewards)")[1].split("##")[0]
    line = next(ln for ln in table.splitlines() if "| len_bonus |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == ["len_bonus", f"{row['reward/len_bonus/mean']:.4g}",
                         f"{row['reward/len_bonus/mean']:.4g}", "0",
                         f"{row['reward/len_bonus/chars']:.4g}"]
    assert json.loads((run / schema.MANIFEST).read_text())["status"] == "done"
