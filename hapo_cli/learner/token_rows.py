"""Stage 6: a seeded sample of responses written token by token (`tokens/step-*.parquet`,
columns `analysis.schema.TOKEN_COLUMNS`) for the token-level figures, each sample's first row
also holding its rendered prompt (`schema.TOKEN_PROMPT`)."""

from __future__ import annotations

import pandas as pd
import torch

from analysis import schema

from .. import algo
from .batch import TrainBatch
from .targets import Targets
from .update import UpdateResult


def token_rows(step: int, batch: TrainBatch, entropy, tg: Targets, upd: UpdateResult, tokenizer,
               responses: int, seed: int):
    n = min(responses, len(batch.scores))
    g = torch.Generator().manual_seed(seed * 7919 + step)
    pick = torch.randperm(len(batch.scores), generator=g)[:n].sort().values
    # the side the clip binds on, by the loss's own rule, for the advantage before C
    # (float64, as the values are written)
    low, high = algo.clip_sides(upd.ratio[pick].double(), tg.adv.adv[pick].double(),
                                tg.eps_low[pick].double(), tg.eps_high[pick].double())
    rows = []
    prompt_len = batch.input_ids.shape[1] - batch.response_ids.shape[1]  # P (left-padded)
    for j, i in enumerate(pick.tolist()):
        ids = batch.response_ids[i].tolist()
        prompt = batch.input_ids[i, :prompt_len][batch.attention_mask[i, :prompt_len].bool()]
        for n, p in enumerate(torch.nonzero(batch.mask[i]).flatten().tolist()):
            rows.append({
                # the sample's first row: the prompt as the model saw it (template included)
                schema.TOKEN_PROMPT: (tokenizer.decode(prompt.tolist(), skip_special_tokens=False)
                                     if n == 0 else None),
                "step": step, "sample": i, "position": p, "token_id": ids[p],
                "token_text": tokenizer.decode([ids[p]]),
                "entropy": float(entropy[i, p]), "h": float(tg.h[i, p]),
                "temperature": float(batch.temperature[i, p]), "ratio": float(upd.ratio[i, p]),
                "adv": float(tg.adv.adv[i, p]), "adv_c": float(upd.adv_c[i, p]),
                "eps_low": float(tg.eps_low[i, p]), "eps_high": float(tg.eps_high[i, p]),
                "clip_side": "low" if low[j, p] else "high" if high[j, p] else "none",
                "reward": float(batch.scores[i]), "acc": float(batch.acc[i]),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=[*schema.TOKEN_COLUMNS, *schema.TOKEN_OPTIONAL_COLUMNS])
