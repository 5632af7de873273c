"""The baseline contract. A baseline is a `Baseline` subclass registered by name; the learner
asks it for the advantages, the token masks, the loss normaliser and the loss itself.

Class attributes say what it is, readable without torch (the recipe loader uses them):
`source` (the paper it follows), `defaults` (recipe values as published, filled in where a
recipe leaves them out), `fixed` (those of `defaults` an explicit other value would contradict:
a load-time error, so a run is never labelled with a method it does not train), and
`refuses` (HAPO letters not defined on it, with the reason: refused at load), and `Config` (its
own settings, the recipe's `algo.<name>` section, defaults as published).
Methods import torch and `algo` when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Advantages:
    adv: Tensor  # (B, T) advantage of each token the loss uses (before C); 0 where masked
    seq_tok: Tensor  # (B, T) sequence-level GRPO advantage broadcast (the adv/seq_* metrics)
    fallback: Tensor  # (G,) bool: groups B fell back to sequence level; empty when B is off


class Baseline:
    """Token-level PPO with group-normalised advantages (or HAPO's B), every valid token in the
    loss, dual clip, the recipe's aggregation: DAPO's objective, which subclasses change."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    fixed: ClassVar[tuple[str, ...]] = ()
    refuses: ClassVar[dict[str, str]] = {}  # letter -> why it is not defined here
    scale_by_std: ClassVar[bool] = True  # sequence advantages divided by the group std
    # Its own settings: a `_Section` (pydantic, unknown keys refused) whose field defaults are
    # the published values; the recipe gets it as `algo.<section>` (section: the name with '-'
    # as '_'). None: the baseline has no settings of its own.
    Config: ClassVar[type | None] = None
    # Old recipe keys of these settings, still read: {'algo key': 'field of Config'}.
    renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def section(cls) -> str:
        """The recipe section of its settings: `algo.<section>`."""
        return cls.name.replace("-", "_")

    def settings(self, cfg):
        """Its own settings (`Config`) out of the recipe's algo section `cfg`."""
        return getattr(cfg, self.section())

    # ---- load time (no torch) ----
    def check(self, recipe) -> str | None:
        """A one-line reason the recipe's letters cannot apply to this baseline, or None."""
        from ..components import letters_of

        bad = [c for c in letters_of(recipe.algo) if c in self.refuses]
        if bad:
            c = bad[0]
            return (f"algo.baseline={self.name} with component {c}: {self.refuses[c]} "
                    f"(drop {c}, or choose another baseline)")
        return None

    # ---- stage 3: targets ----
    def advantages(self, scores: Tensor, group_ids: Tensor, mask: Tensor, cfg) -> Advantages:
        """scores (B,), group_ids (B,) , mask (B, T) bool; cfg the recipe's algo section."""
        import torch

        from .. import algo

        seq_adv = algo.grpo_advantages(scores, group_ids, eps=cfg.adv_eps,
                                       scale_by_std=self.scale_by_std)  # (B,)
        seq_tok = seq_adv[:, None].expand_as(mask).masked_fill(~mask, 0.0)  # (B, T)
        if not cfg.token_level_advantage:
            return Advantages(seq_tok, seq_tok, torch.zeros(0))
        adv, fallback = algo.token_level_group_advantages(
            scores, mask, group_ids, eps=cfg.adv_eps, fallback_threshold=cfg.fallback_threshold,
            return_fallback=True,
        )
        return Advantages(adv, seq_tok, fallback)

    def token_masks(self, entropy: Tensor, mask: Tensor, cfg, ranks) -> tuple[Tensor, Tensor]:
        """(tokens the loss counts, tokens the loss normaliser counts), both (B, T) bool."""
        return mask, mask

    # ---- stage 4: the loss ----
    def loss_agg(self, cfg) -> str:
        return cfg.loss_agg

    def local_normalizer(self, norm_mask: Tensor, recipe) -> Tensor:
        """This rank's share of the mini-batch's loss denominator (the learner sums it over
        ranks): valid tokens for token-mean, non-empty sequences otherwise."""
        if self.loss_agg(recipe.algo) == "token-mean":
            return norm_mask.sum()
        return (norm_mask.sum(-1) > 0).sum()

    def loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
             eps_low: Tensor, eps_high: Tensor, cfg, *, normalizer: float, h: Tensor,
             adv_before: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) of one micro-batch; all (B, T); adv after C (and TIS)."""
        from .. import algo

        return algo.policy_loss(logp, old_logp, adv, mask, eps_low, eps_high, clip_c=cfg.clip_c,
                                agg=self.loss_agg(cfg), normalizer=normalizer, h=h,
                                adv_before=adv_before)
