"""Stage 5: the step's metrics over the whole global batch (all ranks). Token entropies and
per-response values are gathered (for quantiles and per-response means); every other
token-level quantity is a local sum reduced across ranks, in one reduction."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from analysis import schema

from .. import algo
from .batch import TrainBatch
from .ranks import Ranks
from .targets import Targets


def batch_metrics(batch: TrainBatch, entropy: Tensor, old_logp: Tensor, tg: Targets,
                  critical_threshold: float | None, ranks: Ranks) -> dict[str, Any]:
    mask = batch.mask
    cat = ranks.cat
    ent = cat(entropy[mask].float())
    p20, p80 = (algo.quantile_1d(ent, q, "paper") for q in (0.2, 0.8))
    lens = cat(batch.response_len.float())
    acc = cat(batch.acc.float())
    scores = cat(batch.scores.float())
    correct = acc > 0.5
    crit = cat(((entropy >= (critical_threshold or 0.0)) & mask).sum(-1).float())
    temps = batch.temperature[mask].double()
    gap = (old_logp - batch.behaviour_logp)[mask].abs().double()
    a, sq = tg.adv.adv[mask].double(), tg.adv.seq_tok[mask].double()
    pos, neg = algo.advantage_signs(a, torch.ones_like(a, dtype=torch.bool))
    fallback = tg.adv.fallback
    t = ranks.sum_dict({
        "n": float(mask.sum()), "t_sum": float(temps.sum()), "t_sq": float((temps**2).sum()),
        "gap": float(gap.sum()),
        "pos_sum": float(a[pos].sum()), "neg_sum": float(a[neg].sum()),
        "pos_n": float(pos.sum()), "neg_n": float(neg.sum()),
        "seq_pos": float(sq[sq > 0].sum()), "seq_neg": float(sq[sq < 0].sum()),
        "fallback": float(fallback.sum()) if fallback.numel() else 0.0,
        "trunc": float(batch.truncated.float().sum()),
    })  # fmt: skip
    n = max(t["n"], 1.0)
    t_mean = t["t_sum"] / n
    t_var = max(t["t_sq"] / n - t_mean**2, 0.0) * (n / max(n - 1, 1.0))  # unbiased
    stats, info = tg.stats, tg.stats_info
    return {
        schema.ENTROPY_MEAN: float(ent.mean()) if ent.numel() else 0.0,
        schema.ENTROPY_P20: p20,
        schema.ENTROPY_P80: p80,
        schema.BEHAVIOUR_LOGP_GAP: t["gap"] / n,
        schema.ADV_POS_TOKEN_SUM: t["pos_sum"],
        schema.ADV_NEG_TOKEN_SUM: t["neg_sum"],
        schema.ADV_POS_TOKEN_COUNT: t["pos_n"],
        schema.ADV_NEG_TOKEN_COUNT: t["neg_n"],
        schema.ADV_SEQ_POS_TOKEN_SUM: t["seq_pos"],
        schema.ADV_SEQ_NEG_TOKEN_SUM: t["seq_neg"],
        schema.ADV_FALLBACK_GROUPS: t["fallback"],
        schema.RESPONSE_LEN_MEAN: float(lens.mean()),
        schema.RESPONSE_LEN_CORRECT_MEAN: float(lens[correct].mean()) if correct.any() else None,
        schema.RESPONSE_LEN_INCORRECT_MEAN: float(lens[~correct].mean()) if (~correct).any()
        else None,
        schema.CRITICAL_TOKENS: float(crit.mean()),
        schema.CRITICAL_THRESHOLD: critical_threshold,
        schema.TEMPERATURE_MEAN: t_mean if t["n"] else None,
        schema.TEMPERATURE_STD: math.sqrt(t_var),
        schema.TRUNCATED_FRAC: t["trunc"] / max(len(lens), 1),
        schema.RESPONSES: float(len(lens)),
        schema.REWARD_MEAN: float(scores.mean()),
        schema.REWARD_ACC: float(acc.mean()),
        schema.ENTROPY_STATS_RHO: stats.rho,
        schema.ENTROPY_STATS_STD: stats.std,
        schema.ENTROPY_STATS_SCALE_POS: stats.scale_pos,
        schema.ENTROPY_STATS_SCALE_NEG: stats.scale_neg,
        schema.ENTROPY_STATS_EXACT: float(bool(info.get("exact", True))),
        schema.ENTROPY_STATS_BIN_ERROR: float(info.get("quantile_bin_error", 0.0)),
    }


def critical_threshold(entropy: Tensor, mask: Tensor, quantile: float, ranks: Ranks) -> float:
    """Entropy above which a token counts as critical: the `quantile` of the first step's
    token entropies (all ranks), kept for the whole run so counts compare across steps."""
    return algo.quantile_1d(ranks.cat(entropy[mask]).float(), quantile, "paper")
