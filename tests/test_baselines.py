"""The baseline seam (issue 15): each baseline's advantages and token selection, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hapo_cli.baselines import get_baseline
from hapo_cli.learner.ranks import Ranks
from hapo_cli.recipe import load_recipe

ONE = Ranks(SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu")))


def test_dapo_advantages_are_group_normalised_rewards_on_every_token():
    cfg = load_recipe("tiny/dapo").algo
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one group of 4: mean 0.25, std (unbiased) 0.5
    groups = torch.tensor([0, 0, 0, 0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    a = get_baseline("dapo").advantages(scores, groups, mask, cfg)
    want = (scores - 0.25) / (0.5 + cfg.adv_eps)
    torch.testing.assert_close(a.adv, want[:, None].expand(4, 3) * mask)
    assert torch.equal(a.adv, a.seq_tok) and a.fallback.numel() == 0
    lm, nm = get_baseline("dapo").token_masks(torch.rand(4, 3), mask, cfg, ONE)
    assert torch.equal(lm, mask) and torch.equal(nm, mask)


def test_forking_trains_the_top_entropy_tokens_and_keeps_dapos_normaliser():
    cfg = load_recipe("tiny/forking", ["algo.forking.quantile=0.25"]).algo
    # 8 valid tokens with entropies 1..8: the 0.75 quantile (linear) is 6.25 -> tokens 7 and 8
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 6.0, 7.0, 8.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    lm, nm = get_baseline("forking").token_masks(entropy, mask, cfg, ONE)
    assert lm.nonzero().tolist() == [[1, 2], [1, 3]]  # the masked 9.0 never counts
    assert torch.equal(nm, mask)  # forking.normalizer 'all'
    cfg2 = load_recipe("tiny/forking", ["algo.forking.quantile=0.25",
                                        "algo.forking.normalizer=forking"]).algo
    _, nm2 = get_baseline("forking").token_masks(entropy, mask, cfg2, ONE)
    assert torch.equal(nm2, lm)


def test_forking_settings_are_its_own_section_and_old_keys_still_load():
    """algo.forking (ForkingConfig, in baselines/forking.py) holds the published defaults; the
    old flat keys (every earlier run's recipe.yaml has them) are read into it; both forms with
    different values, or an unknown key in the section, is a one-line error naming it."""
    from hapo_cli.errors import RecipeError
    from hapo_cli.sections import AlgoConfig

    assert "forking" in AlgoConfig.model_fields and "forking_quantile" not in AlgoConfig.model_fields
    default = load_recipe("tiny/dapo").algo.forking
    assert (default.quantile, default.normalizer) == (0.2, "all")
    old = load_recipe("tiny/forking", ["algo.forking_quantile=0.3",
                                       "algo.forking_normalizer=forking"]).algo.forking
    assert (old.quantile, old.normalizer) == (0.3, "forking")
    same = load_recipe("tiny/forking", ["algo.forking_quantile=0.2"]).algo.forking
    assert same.quantile == 0.2
    with pytest.raises(RecipeError, match=r"algo\.forking_quantile=0\.3 and algo\.forking\.quantile"
                       r"=0\.2: the same setting twice"):
        load_recipe("tiny/forking", ["algo.forking_quantile=0.3", "algo.forking.quantile=0.2"])
    with pytest.raises(RecipeError, match=r"algo\.forking\.q"):
        load_recipe("tiny/forking", ["algo.forking.q=0.3"])
