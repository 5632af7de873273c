"""Training-batch assembly: rollouts + rewards -> one padded batch of whole groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..tensors import left_pad, left_pad_prompts


@dataclass
class TrainBatch:
    """B responses of P prompts x G samples, groups adjacent. Tensors (B, T) unless noted."""

    input_ids: Tensor  # (B, P+T) left-padded prompt | right-padded response
    attention_mask: Tensor  # (B, P+T)
    response_ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) bool: valid response tokens (incl. EOS)
    behaviour_logp: Tensor  # (B, T) log-prob under the rollout's own temperature
    temperature: Tensor  # (B, T) T_t used at sampling
    rollout_entropy: Tensor  # (B, T) untempered entropy at decode time
    scores: Tensor  # (B,) reward (accuracy + shaping)
    acc: Tensor  # (B,) 0/1 correctness
    group_ids: Tensor  # (B,) group index 0..P-1
    response_len: Tensor  # (B,)
    truncated: Tensor  # (B,) bool: finish_reason == 'length'
    texts: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    decode_stats: bool = True  # False: temperature/rollout_entropy still to be filled (vLLM)
    base_logp: Tensor | None = None  # (B, T) log-prob at the base T (HF engine under A), or None

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.max().item()) + 1 if self.group_ids.numel() else 0

    def select_groups(self, groups: list[int]) -> TrainBatch:
        """Keep whole groups (in the given order), renumbered 0..len-1."""
        idx_lists = [torch.nonzero(self.group_ids == g).flatten() for g in groups]
        idx = torch.cat(idx_lists) if idx_lists else torch.zeros(0, dtype=torch.long)
        new_gid = torch.cat(
            [torch.full((len(ix),), i, dtype=torch.long) for i, ix in enumerate(idx_lists)]
        ) if idx_lists else torch.zeros(0, dtype=torch.long)
        return self._index(idx, new_gid)

    def _index(self, idx: Tensor, group_ids: Tensor) -> TrainBatch:
        il = idx.tolist()
        return TrainBatch(
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            response_ids=self.response_ids[idx],
            mask=self.mask[idx],
            behaviour_logp=self.behaviour_logp[idx],
            temperature=self.temperature[idx],
            rollout_entropy=self.rollout_entropy[idx],
            scores=self.scores[idx],
            acc=self.acc[idx],
            group_ids=group_ids,
            response_len=self.response_len[idx],
            truncated=self.truncated[idx],
            texts=[self.texts[i] for i in il] if self.texts else [],
            uids=[self.uids[i] for i in il] if self.uids else [],
            decode_stats=self.decode_stats,
            base_logp=self.base_logp[idx] if self.base_logp is not None else None,
        )


def concat_batches(batches: list[TrainBatch], pad_id: int) -> TrainBatch:
    """Concatenate batches of different prompt/response widths (re-padding), groups renumbered."""
    if len(batches) == 1:
        return batches[0]
    T = max(b.response_ids.shape[1] for b in batches)
    P = max(b.input_ids.shape[1] - b.response_ids.shape[1] for b in batches)

    def prompt_part(b: TrainBatch) -> tuple[Tensor, Tensor]:
        p = b.input_ids.shape[1] - b.response_ids.shape[1]
        return (left_pad(list(b.input_ids[:, :p].long()), pad_id, P),
                left_pad(list(b.attention_mask[:, :p]), 0, P))

    def resp(b: TrainBatch, t: Tensor, value) -> Tensor:
        out = torch.full((t.shape[0], T), value, dtype=t.dtype)
        out[:, : t.shape[1]] = t
        return out

    parts_ids, parts_am, gids = [], [], []
    bases = [b.base_logp for b in batches if b.base_logp is not None]
    offset = 0
    for b in batches:
        ids, am = prompt_part(b)
        parts_ids.append(torch.cat([ids, resp(b, b.response_ids, pad_id)], 1))
        parts_am.append(torch.cat([am, resp(b, b.mask.to(am.dtype), 0)], 1))
        gids.append(b.group_ids + offset)
        offset += b.num_groups
    return TrainBatch(
        input_ids=torch.cat(parts_ids),
        attention_mask=torch.cat(parts_am),
        response_ids=torch.cat([resp(b, b.response_ids, pad_id) for b in batches]),
        mask=torch.cat([resp(b, b.mask, False) for b in batches]),
        behaviour_logp=torch.cat([resp(b, b.behaviour_logp, 0.0) for b in batches]),
        temperature=torch.cat([resp(b, b.temperature, 1.0) for b in batches]),
        rollout_entropy=torch.cat([resp(b, b.rollout_entropy, 0.0) for b in batches]),
        scores=torch.cat([b.scores for b in batches]),
        acc=torch.cat([b.acc for b in batches]),
        group_ids=torch.cat(gids),
        response_len=torch.cat([b.response_len for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        texts=[t for b in batches for t in b.texts],
        uids=[u for b in batches for u in b.uids],
        decode_stats=all(b.decode_stats for b in batches),
        base_logp=torch.cat([resp(b, t, 0.0) for b, t in zip(batches, bases, strict=True)])
        if len(bases) == len(batches) else None,
    )


def build_train_batch(examples, rollout, scores: Tensor, acc: Tensor, texts, pad_id: int) -> TrainBatch:
    """examples: the prompts given to the engine; rollout: its RolloutBatch (samples adjacent)."""
    pidx = rollout.prompt_index.long()
    ids, am = left_pad_prompts([examples[i].prompt_ids for i in pidx.tolist()], pad_id)
    mask = rollout.response_mask.bool()
    resp = rollout.response_ids.long().masked_fill(~mask, pad_id)
    truncated = torch.tensor([r == "length" for r in rollout.finish_reason], dtype=torch.bool)
    return TrainBatch(
        input_ids=torch.cat([ids, resp], 1),
        attention_mask=torch.cat([am, mask.long()], 1),
        response_ids=resp,
        mask=mask,
        behaviour_logp=rollout.behaviour_logp.float(),
        temperature=rollout.temperature.float().masked_fill(~mask, 1.0),  # never 0 on padding
        rollout_entropy=rollout.entropy.float(),
        scores=scores.float(),
        acc=acc.float(),
        group_ids=pidx.clone(),
        response_len=mask.sum(-1),
        truncated=truncated,
        texts=list(texts),
        uids=[examples[i].uid for i in pidx.tolist()],
        decode_stats=bool(getattr(rollout, "decode_stats", True)),
        base_logp=rollout.base_logp.float() if getattr(rollout, "base_logp", None) is not None
        else None,
    )


def mixed_groups(values: Tensor, group_ids: Tensor) -> Tensor:
    """(G,) bool: groups whose values are not all equal (vectorised: max != min per group)."""
    n = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    hi = torch.full((n,), float("-inf")).scatter_reduce(0, group_ids, values.float(), "amax")
    lo = torch.full((n,), float("inf")).scatter_reduce(0, group_ids, values.float(), "amin")
    return hi > lo
