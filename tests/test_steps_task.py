"""The `steps` task: arith prompts answered directly ("#66") or in worked steps, the warm-up's
mixture of the two, its verifier and its warm-up cache key."""

from __future__ import annotations

import math
import re

import pytest

from hapo_cli import models
from hapo_cli.data import SyntheticStream, load_benchmark
from hapo_cli.data.synthetic import (
    STEPS_DIRECT_FRACTION,
    TASKS,
    direct_response,
    synthetic_item,
)
from hapo_cli.recipe import DataConfig, ModelConfig, WarmupConfig, load_recipe
from hapo_cli.rewards.verify import verify

WORKED = re.compile(r"(\d+)([+-])(\d+)=(\d+)")


def _check_worked(target: str, prompt: str) -> int:
    """Oracle: re-compute every written step with int arithmetic; the steps follow the prompt's
    operands in order and each starts from the previous result. Returns the final value."""
    *steps, final = target.split(";")
    operands = re.findall(r"\d+|[+-]", prompt.removesuffix("="))
    value = int(operands[0])
    for k, step in enumerate(steps):
        a, op, b, result = WORKED.fullmatch(step).groups()
        assert (int(a), op, b) == (value, operands[2 * k + 1], operands[2 * k + 2])
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(result) == value
    assert final == f"#{value}"
    return value


def test_steps_first_examples_by_hand():
    # seed 1, difficulty 2 (3 operands in [0, 99]); by hand: 29-14 = 15, 15+53 = 68;
    # 13+13 = 26, 26+57 = 83. The reference target (training, held-out) is the worked style.
    got = [synthetic_item("steps", 2, "train", 1, i) for i in range(2)]
    assert [(x.prompt, x.target, x.answer) for x in got] == [
        ("29-14+53=", "29-14=15;15+53=68;#68", "68"),
        ("13+13+57=", "13+13=26;26+57=83;#83", "83"),
    ]
    # the warm-up stream at the default mixture: direct answers and worked steps, by hand
    # 90-71+41 = 60, 52+20-68 = 4, 17+66 = 83 and 83-2 = 81, 94-3-69 = 22
    warm = [synthetic_item("steps", 2, "warmup", 0, i, 0.5) for i in range(4)]
    assert [(x.prompt, x.target) for x in warm] == [
        ("90-71+41=", "#60"),
        ("52+20-68=", "#4"),
        ("17+66-2=", "17+66=83;83-2=81;#81"),
        ("94-3-69=", "#22"),
    ]
    assert direct_response("66") == "#66"
    assert TASKS["steps"].direct_fraction == STEPS_DIRECT_FRACTION
    assert TASKS["arith"].direct_fraction == 0.0


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_both_styles_are_well_formed_and_right(difficulty):
    for i in range(300):
        x = synthetic_item("steps", difficulty, "warmup", 3, i, 0.5)
        if x.target.startswith("#"):
            assert x.target == f"#{x.answer}"  # direct: '#', the answer, nothing else
            assert re.fullmatch(r"#\d+", x.target)
        else:
            assert str(_check_worked(x.target, x.prompt)) == x.answer
        # the prompt and answer do not depend on the style drawn after them
        plain = synthetic_item("steps", difficulty, "warmup", 3, i)
        assert (plain.prompt, plain.answer) == (x.prompt, x.answer)
        assert str(_check_worked(plain.target, plain.prompt)) == x.answer


def test_mixture_ratio_and_determinism():
    n = 4000
    for frac in (0.2, 0.5, 0.8):
        direct = sum(
            synthetic_item("steps", 2, "warmup", 0, i, frac).target.startswith("#")
            for i in range(n)
        )
        # i.i.d. Bernoulli(frac) draws: 4 standard deviations sqrt(f(1-f)/n) is <= 0.032 at
        # n=4000; a correct generator misses it with probability ~6e-5 (and it is seeded)
        assert abs(direct / n - frac) <= 4 * math.sqrt(frac * (1 - frac) / n)
    # the extremes are exact: 0 never draws the direct style (arith's streams are unchanged),
    # 1 always does
    assert not any(synthetic_item("steps", 2, "warmup", 0, i).target.startswith("#")
                   for i in range(200))
    assert all(synthetic_item("steps", 2, "warmup", 0, i, 1.0).target.startswith("#")
               for i in range(200))
    # pure function of the key: example 9 alone equals the 10th of a sequence, twice
    seq = [synthetic_item("steps", 2, "warmup", 0, i, 0.5) for i in range(10)]
    assert synthetic_item("steps", 2, "warmup", 0, 9, 0.5) == seq[9]
    assert [synthetic_item("steps", 2, "warmup", 0, i, 0.5) for i in range(10)] == seq
    assert [synthetic_item("steps", 2, "warmup", 1, i, 0.5) for i in range(10)] != seq
    with pytest.raises(ValueError, match="direct_fraction=1.5 must be in"):
        synthetic_item("steps", 2, "warmup", 0, 0, 1.5)


def test_stream_carries_the_mixture_and_tokenizes_every_character():
    tok = models.build_tokenizer()
    stream = SyntheticStream("steps", 2, 0, tok, "warmup", False, direct_fraction=0.5)
    batch = stream.next_batch(4)
    assert [ex.target for ex in batch][:2] == ["#60", "#4"]  # as by hand above
    for ex in batch:
        ids = tok(ex.target, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == len(ex.target)  # ';' '#' in vocab
    # training prompts are the same whatever the warm-up mixture
    train = SyntheticStream("steps", 2, 1, tok).next_batch(2)
    assert [ex.target for ex in train] == ["29-14=15;15+53=68;#68", "13+13=26;26+57=83;#83"]


def test_verifier_grades_the_final_answer_of_either_style():
    # 47+38 = 85, 85-19 = 66
    assert verify("exact", "#66", "66")
    assert verify("exact", "47+38=85;85-19=66;#66", "66")
    assert not verify("exact", "#67", "66")
    assert not verify("exact", "47+38=85;85-19=66;#65", "66")
    # a wrong intermediate step with the right final answer counts as correct: the reward is
    # the outcome (the answer after the last '#'), as the paper's verifiers; documented in
    # hapo_cli/data/synthetic.py
    assert verify("exact", "47+38=84;84-19=66;#66", "66")
    # malformed: no '#', nothing after it, steps cut off before the answer
    assert not verify("exact", "66", "66")
    assert not verify("exact", "#", "66")
    assert not verify("exact", "47+38=85;85-19=66;", "66")
    assert not verify("exact", "47+38=85;85-1", "66")


def test_warmup_cache_key_separates_tasks_and_mixtures(tmp_path):
    cfg = ModelConfig(init="warmup", cache_dir=str(tmp_path))
    arith, steps = DataConfig(task="arith"), DataConfig(task="steps")
    key = models.warmup_key
    assert key(cfg, arith) != key(cfg, steps)
    # None means the task's default: the same warm-up, the same key
    default = ModelConfig(init="warmup", cache_dir=str(tmp_path),
                          warmup=WarmupConfig(direct_fraction=STEPS_DIRECT_FRACTION))
    assert key(default, steps) == key(cfg, steps)
    other = ModelConfig(init="warmup", cache_dir=str(tmp_path),
                        warmup=WarmupConfig(direct_fraction=0.25))
    assert key(other, steps) != key(cfg, steps)
    # a mixed arith warm-up is another policy than arith's; 0 is arith's own (unchanged) key
    assert key(other, arith) != key(cfg, arith)
    zero = ModelConfig(init="warmup", cache_dir=str(tmp_path),
                       warmup=WarmupConfig(direct_fraction=0.0))
    assert key(zero, arith) == key(cfg, arith)
    assert models.direct_fraction(cfg.warmup, "steps") == STEPS_DIRECT_FRACTION
    assert models.direct_fraction(other.warmup, "steps") == 0.25


def test_recipes_and_benchmark():
    for name in ("tiny/steps_hapo", "tiny/steps_dapo"):
        r = load_recipe(name)
        assert r.data.task == "steps" and r.model.init == "warmup"
        # the budget's longest response (difficulty 2: 'dd+dd=dd;dd-dd=dd;#dd' + <eos>, 22
        # tokens) ends before the overlong buffer starts
        assert 22 <= r.rollout.max_new_tokens - r.train.overlong.buffer_len
    hapo, dapo = load_recipe("tiny/steps_hapo"), load_recipe("tiny/steps_dapo")
    assert hapo.components == "ABCD" and dapo.components == "none"
    assert hapo.model_dump(exclude={"name", "algo"}) == dapo.model_dump(exclude={"name", "algo"})
    tok = models.build_tokenizer()
    name, examples = load_benchmark("steps", DataConfig(task="steps"), tok, limit=5)
    assert name == "steps" and len(examples) == 5
    assert all(ex.task == "steps" and ";" in ex.target for ex in examples)


# ---------------------------------------------------------------------------------------------
# end to end: the real `hapo train` moves the response length of the steps task
# ---------------------------------------------------------------------------------------------

# A short budget: a 300-step warm-up on a 50/50 mixture (no accuracy target: it only has to
# learn both styles, about half its samples start with '#'), 30 RL steps of 8 prompts x 8. Measured (2 cores, seeds 1 and
# 2): mean response length 12.6 / 13.7 tokens over steps 1-3, 4.3 / 5.9 over steps 26-30, a
# relative change of -66 % / -57 %. Nearly every reward is 0 this early, so the signal that
# remains is DAPO's overlong shaping, which only ever penalises long (worked, rambling)
# responses, and AdamW's momentum carries each update on: the fork token moves to '#'.
E2E = [
    "model.warmup.steps=300",
    "model.warmup.direct_fraction=0.5",
    "model.warmup.target_acc=null",
    "train.prompts_per_step=8",
    "train.mini_batch_prompts=4",  # the measured run's update shape, not the recipe's
    "train.micro_batch_size=32",
    "train.ppo_epochs=1",
    "train.lr=3e-4",
    "train.dynamic_sampling.enabled=false",
    "eval.limit=16",
    "eval.n=2",
    "eval.every=0",
    "log.checkpoint_every=0",
    "log.token_sample_every=0",
]


@pytest.mark.slow
def test_rl_moves_the_response_length(tmp_path):
    from conftest import read_metrics
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    out = tmp_path / "run"
    args = ["train", "--recipe", "tiny/steps_hapo", "--max-steps", "30", "--output", str(out)]
    for s in [*E2E, f"model.cache_dir={tmp_path / 'cache'}"]:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lens = {r["step"]: r["rollout/response_len_mean"] for r in read_metrics(out) if r["step"]}
    assert sorted(lens) == list(range(1, 31))
    start = sum(lens[s] for s in (1, 2, 3)) / 3  # robust: means over 3 and 5 steps of 64
    end = sum(lens[s] for s in range(26, 31)) / 5
    # the warm-up learned both styles: a mean between direct (~4 tokens) and worked (~20)
    assert 8 <= start <= 18, lens
    # the goal of the calibration, a >= 30 % change, in either direction (measured 57-66 %, so
    # half of the measured change would still pass)
    assert abs(end - start) >= 0.3 * start, lens
