"""Baselines own their objective (issue 27): registration, published defaults filled in where a
recipe is silent, contradictions and undefined letters refused at load in one line, each
baseline's loss and normaliser, and the recipes under recipes/tiny/."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from analysis import schema
from hapo_cli.baselines import baseline_class, baseline_names, get_baseline
from hapo_cli.recipe import RecipeError, list_recipes, load_recipe

TINY = ("dapo", "grpo", "dr-grpo", "gspo", "cispo", "forking")


def test_every_baseline_cites_its_source_and_has_a_tiny_recipe():
    assert set(baseline_names()) == set(TINY)
    for name in baseline_names():
        cls = baseline_class(name)
        assert "arXiv" in cls.source, name
        assert f"tiny/{name}" in list_recipes()
        r = load_recipe(f"tiny/{name}")
        assert r.algo.baseline == name and r.components == "none"
        assert "arXiv" in open(f"recipes/tiny/{name}.yaml").read().split("name:")[0]


def test_loading_a_recipe_reads_baselines_without_torch():
    import subprocess

    code = ("import sys; from hapo_cli.recipe import load_recipe; load_recipe('tiny/gspo'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_published_defaults_fill_what_the_recipe_leaves_out():
    # tiny/hapo's algo section names no kl_coef, eps or loss_agg, so grpo's come in; its
    # explicit dynamic_sampling.enabled=true contradicts GRPO and is refused
    with pytest.raises(RecipeError, match="algo.baseline=grpo: train.dynamic_sampling.enabled=True"
                                          " is not grpo .*arXiv 2402.03300"):
        load_recipe("tiny/hapo", ["algo.baseline=grpo"])
    r = load_recipe("tiny/hapo", ["algo.baseline=grpo", "train.dynamic_sampling.enabled=false"])
    a = r.algo
    assert (a.loss_agg, a.kl_coef, a.kl_estimator) == ("seq-mean-token-mean", 0.04, "k3")
    assert r.train.overlong.enabled is True  # given explicitly by tiny/hapo: a hyperparameter
    r = load_recipe("tiny/hapo", ["algo.baseline=grpo", "train.dynamic_sampling.enabled=false",
                                  "algo.kl_coef=0"])
    assert r.algo.kl_coef == 0.0  # beta is a hyperparameter, not what makes GRPO GRPO
    with pytest.raises(RecipeError, match="algo.loss_agg='token-mean' is not dr-grpo"):
        load_recipe("tiny/dr-grpo", ["algo.loss_agg=token-mean"])
    # dapo (the default) adds nothing: every field default is DAPO's
    assert baseline_class("dapo").defaults == {}


def test_letters_undefined_on_gspo_are_refused_at_load():
    with pytest.raises(RecipeError, match="algo.baseline=gspo with component C: GSPO has one "
                                          "ratio and one clip range per sequence"):
        load_recipe("tiny/gspo", components="ABCD")
    with pytest.raises(RecipeError, match="component D"):
        load_recipe("tiny/gspo", components="ABD")
    assert load_recipe("tiny/gspo", components="AB").components == "AB"
    for name in ("dapo", "grpo", "dr-grpo", "cispo", "forking"):
        assert load_recipe(f"tiny/{name}", components="ABCD").components == "ABCD"


def test_kl_settings_are_checked_at_load(tmp_path):
    with pytest.raises(RecipeError, match="algo.kl_estimator"):
        load_recipe("tiny/dapo", ["algo.kl_estimator=k4"])
    with pytest.raises(RecipeError, match="algo.kl_coef"):
        load_recipe("tiny/dapo", ["algo.kl_coef=-1"])
    with pytest.raises(RecipeError, match="model.reference='/nope': not a directory"):
        load_recipe("tiny/dapo", ["algo.kl_coef=0.1", "model.reference=/nope"])
    assert load_recipe("tiny/dapo", ["model.reference=/nope"]).algo.kl_coef == 0  # unused
    assert load_recipe("tiny/dapo", [f"model.reference={tmp_path}", "algo.kl_coef=0.1"])


def _recipe(name, *sets):
    return load_recipe(f"tiny/{name}", list(sets))


def test_dr_grpo_divides_token_sums_by_sequences_times_the_budget():
    r = _recipe("dr-grpo")
    bl = get_baseline("dr-grpo")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert int(bl.local_normalizer(mask, r)) == 2 * r.rollout.max_new_tokens  # 2 non-empty rows
    scores, groups = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0])
    adv = bl.advantages(scores, groups, torch.ones(3, 2, dtype=torch.bool), r.algo).adv
    torch.testing.assert_close(adv[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3]))  # no std


def test_each_baseline_computes_its_own_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(2, 3) * 0.1, torch.randn(2, 3) * 0.1
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    h = torch.zeros(2, 3)
    from hapo_cli import algo

    for name, want in (
        ("dapo", lambda c: algo.policy_loss(logp, old, adv, mask, 0.2, 0.2, agg="token-mean",
                                            normalizer=5.0)),
        ("gspo", lambda c: algo.gspo_policy_loss(logp, old, adv, mask, 3e-4, 4e-4,
                                                 normalizer=5.0)),
        ("cispo", lambda c: algo.cispo_policy_loss(logp, old, adv, mask, 1.0, 0.28,
                                                   normalizer=5.0)),
    ):
        cfg = _recipe(name).algo
        eps_lo = torch.full((2, 3), cfg.eps_low)
        eps_hi = torch.full((2, 3), cfg.eps_high)
        got, m = get_baseline(name).loss(logp, old, adv, mask, eps_lo, eps_hi, cfg,
                                         normalizer=5.0, h=h, adv_before=adv)
        torch.testing.assert_close(got, want(cfg)[0])
        assert schema.PG_LOSS in m and math.isfinite(float(got))


def test_unknown_baseline_is_one_line_naming_the_choices():
    with pytest.raises(ValueError, match="algo.baseline='ppo' is not one of: dapo, cispo"):
        get_baseline("ppo")


def test_ablate_crosses_baselines_with_variants_and_leaves_out_undefined_letters():
    from hapo_cli.ablate.grid import cross_baselines, expand_variants
    from hapo_cli.ablate.plan import PlanEntry, run_recipe
    from hapo_cli.errors import HapoError

    variants = expand_variants("ABCD", variants="none,AB,ABCD")
    out, left = cross_baselines(variants, "dapo,grpo,gspo", ["algo.kl_coef=0"])
    names = [v.name for v in out]
    assert names == ["dapo-none", "dapo-AB", "dapo-ABCD", "grpo-none", "grpo-AB", "grpo-ABCD",
                     "gspo-none", "gspo-AB"]
    assert left == ["gspo-ABCD: GSPO has one ratio and one clip range per sequence, not per "
                    "token (component C)"]
    grpo_abcd = out[names.index("grpo-ABCD")]
    assert "algo.kl_coef=0.04" not in grpo_abcd.overrides  # the user's --set wins
    # each run resolves through the recipe loader, even from a DAPO recipe
    r = run_recipe("tiny/hapo", ["algo.kl_coef=0"],
                   PlanEntry("grpo-ABCD", 1, "grpo-ABCD-s1", "ABCD", grpo_abcd.overrides))
    assert (r.algo.baseline, r.components, r.train.dynamic_sampling.enabled,
            r.train.overlong.enabled, r.algo.kl_coef) == ("grpo", "ABCD", False, False, 0.0)
    with pytest.raises(HapoError, match="'ppo' is not a baseline; expected a comma list of: dapo"):
        cross_baselines(variants, "dapo,ppo")
