"""The baseline seam (issue 15): each baseline's advantages and token selection, by hand."""

from __future__ import annotations

from types import SimpleNamespace

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
    cfg = load_recipe("tiny/forking", ["algo.forking_quantile=0.25"]).algo
    # 8 valid tokens with entropies 1..8: the 0.75 quantile (linear) is 6.25 -> tokens 7 and 8
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 6.0, 7.0, 8.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    lm, nm = get_baseline("forking").token_masks(entropy, mask, cfg, ONE)
    assert lm.nonzero().tolist() == [[1, 2], [1, 3]]  # the masked 9.0 never counts
    assert torch.equal(nm, mask)  # forking_normalizer 'all'
    cfg2 = load_recipe("tiny/forking", ["algo.forking_quantile=0.25",
                                        "algo.forking_normalizer=forking"]).algo
    _, nm2 = get_baseline("forking").token_masks(entropy, mask, cfg2, ONE)
    assert torch.equal(nm2, lm)
