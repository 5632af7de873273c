"""Typed recipes: loading, overrides, validation errors that name the field, components."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hapo_cli.components import apply_components, letters_of, parse_components
from hapo_cli.recipe import (
    AlgoConfig,
    RecipeError,
    TrainConfig,
    list_recipes,
    load_recipe,
    parse_value,
)


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_load_and_differ_only_in_algorithm():
    names = list_recipes()
    assert {"tiny/hapo", "tiny/dapo", "tiny/grpo", "tiny/forking"} <= set(names)
    hapo, dapo = load_recipe("tiny/hapo"), load_recipe("tiny/dapo")
    assert hapo.components == "ABCD" and dapo.components == "none"
    # same task, model and budget
    for section in ("model", "data", "rollout", "train", "eval"):
        assert getattr(hapo, section) == getattr(dapo, section), section


def test_defaults_are_the_authors_recipe():
    a, t = AlgoConfig(), TrainConfig()
    assert (a.tau, a.beta, a.alpha, a.eps_low, a.eps_high, a.clip_c) == (0.05, 1, 1, 0.2, 0.2, 10)
    assert a.entropy_pivot == 0.8 and a.entropy_norm == "paper" and a.fallback_threshold == 5.0
    assert a.loss_agg == "token-mean" and t.weight_decay == 0.1 and t.grad_clip == 1.0
    assert t.lr == 1e-6 and t.warmup_steps == 10


def test_overrides_are_typed():
    r = load_recipe("tiny/hapo", ["train.lr=3e-4", "algo.adaptive_clip=false", "rollout.n=4",
                                  "train.mini_batch_prompts=4", "train.micro_batch_size=16"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.algo.adaptive_clip is False and r.components == "ABC"
    assert r.rollout.n == 4
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("null") is None


def test_recipe_is_frozen():
    r = load_recipe("tiny/hapo")
    with pytest.raises(ValidationError):
        r.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("train:\n  lrr: 1\n", "train.lrr"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("algo:\n  eps_low: 1.5\n", "algo.eps_low"),
        ("algo:\n  entropy_pivot: 1.2\n", "algo.entropy_pivot"),
        ("algo:\n  tau: -0.1\n", "algo.tau"),
        ("algo:\n  loss_agg: ppo-clip\n", "algo.loss_agg"),
        ("model:\n  init: pretrained\n", "model.path"),
    ],
)
def test_bad_recipe_names_the_field(tmp_path, text, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_cross_field_divisibility(tmp_path):
    text = "train:\n  prompts_per_step: 10\n  mini_batch_prompts: 4\n"
    with pytest.raises(RecipeError, match="prompts_per_step=10 must be a multiple"):
        load_recipe(write(tmp_path, text))


def test_unknown_override_and_bad_syntax():
    with pytest.raises(RecipeError, match="unknown key 'algo.gamma'"):
        load_recipe("tiny/hapo", ["algo.gamma=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe("tiny/hapo", ["algo.tau"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("tiny/nope")


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError, match="line"):
        load_recipe(write(tmp_path, "train:\n  lr: [1,\n"))


@pytest.mark.parametrize(
    ("spec", "canon"), [("ABCD", "ABCD"), ("dba", "ABD"), ("none", "none"), ("A,C", "AC")]
)
def test_components_parse(spec, canon):
    assert parse_components(spec) == canon


def test_components_apply_and_roundtrip():
    for spec in ("none", "A", "BD", "ABCD"):
        r = load_recipe("tiny/hapo", components=spec)
        assert r.components == spec
        assert letters_of(r.algo) == spec
    d = apply_components({}, "AD")
    assert d["algo"] == {"adaptive_temperature": True, "token_level_advantage": False,
                         "redistribute": False, "adaptive_clip": True}
    with pytest.raises(RecipeError, match="unknown letter"):
        parse_components("ABE")


def test_components_then_set_override_wins():
    r = load_recipe("tiny/dapo", ["algo.redistribute=true"], components="A")
    assert r.components == "AC"


def test_content_hash_is_stable_and_sectioned():
    a = load_recipe("tiny/hapo")
    b = load_recipe("tiny/dapo")
    assert a.content_hash("model", "data") == b.content_hash("model", "data")
    assert a.content_hash() != b.content_hash()


def test_paper_recipes_validate_with_the_authors_values():
    names = [n for n in list_recipes() if n.startswith("paper/")]
    assert len(names) == 8
    for name in names:
        r = load_recipe(name)
        assert r.rollout.n == 16 and r.train.prompts_per_step == 512
        assert r.train.mini_batch_prompts == 32 and r.train.lr == 1e-6
        assert r.train.overlong.buffer_len == 4096 and r.eval.n == 8
        assert (r.eval.temperature, r.eval.top_p) == (0.5, 0.7)
        assert r.components == ("ABCD" if name.endswith("-hapo") else "none")
        assert r.rollout.engine == "vllm" and r.model.init == "pretrained"


def test_tiny_heads_default_and_vllm_head_dim():
    """4 heads (head_dim 16) by default, the demo's calibration; under vLLM, when not given,
    hidden/32 heads (vLLM's CPU attention rejects head_dim 16); an explicit value is kept."""
    from hapo_cli.recipe import load_recipe

    assert load_recipe("tiny/hapo").model.tiny.num_heads == 4
    assert load_recipe("tiny/hapo", ["rollout.engine=vllm"]).model.tiny.num_heads == 2
    assert load_recipe("tiny/hapo", ["rollout.engine=vllm", "model.tiny.hidden_size=128"]
                       ).model.tiny.num_heads == 4
    assert load_recipe("tiny/hapo", ["rollout.engine=vllm", "model.tiny.num_heads=1"]
                       ).model.tiny.num_heads == 1


def test_the_model_section_says_what_it_is():
    """A pretrained model's resolved recipe names no tiny model or warm-up; giving one (even a
    tiny recipe's, switched to a pretrained model) is a one-line error, not a silent drop; the
    embedded model gets both, defaults filled."""
    from hapo_cli.recipe import RecipeError, load_recipe

    paper = load_recipe("paper/qwen2.5-math-7b-hapo", ["model.path=/models/x"])
    assert paper.model.tiny is None and paper.model.warmup is None
    tiny = load_recipe("tiny/hapo")
    assert tiny.model.tiny.hidden_size > 0 and tiny.model.warmup.steps > 0
    with pytest.raises(RecipeError, match="model.tiny applies only to model.init=warmup"):
        load_recipe("paper/qwen2.5-math-7b-hapo", ["model.path=/x", "model.tiny.num_heads=2"])
    with pytest.raises(RecipeError, match="model.warmup applies only .* model.warmup=null"):
        load_recipe("tiny/dapo", ["model.init=pretrained", "model.path=/x",
                                  "model.warmup.steps=150"])
    # a tiny recipe without tiny/warmup settings switches as it is; one with them, after =null
    switched = load_recipe("tiny/dapo", ["model.init=pretrained", "model.path=/x"])
    assert switched.model.tiny is None and switched.model.warmup is None
    steps = load_recipe("tiny/steps_dapo", ["model.init=pretrained", "model.path=/x",
                                           "model.warmup=null"])
    assert steps.model.warmup is None
