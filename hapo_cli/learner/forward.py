"""Learner forward pass: response-token log-probs and entropy without full fp32 logits.

The model is called through its (possibly DDP/FSDP/DeepSpeed-wrapped) forward so gradient hooks
fire. On the fused path the LM head's own forward is replaced, for that one call, by the chunked
fused log-prob function: it runs *inside* the head module's call, where FSDP2 and ZeRO-3 have
gathered `lm_head.weight` (read after the forward, a ZeRO-3 parameter is an empty partition again)
and where the strategy's autocast applies. `logits_to_keep=T+1` hands the head the hidden states of
the response positions only; what the model returns as "logits" is then (2, N) log-probs and
entropies of the N valid response tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from ..algo import fused_logprobs_and_entropy, logprobs_and_entropy


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, L) left-padded mask -> (B, L) positions (0 at the first real token, 0 on padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@contextmanager
def _head_forward(head, fn):
    """Within the block, calling `head` (hooks included) runs `fn(hidden)` as its forward."""
    head.forward = fn  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def response_logprobs(
    model,
    input_ids: Tensor,  # (B, P+T) left-padded prompt | right-padded response
    attention_mask: Tensor,  # (B, P+T)
    response_len: int,  # T
    temperature: float | Tensor | None,  # scalar or (B, T) divisor of the logits
    *,
    fused: bool = True,
    chunk_size: int = 1024,
    entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log pi(y_t | prompt, y_<t) for the T response tokens, and the entropy of the same
    (tempered) distribution: (B, T) each, float32."""
    B, L = input_ids.shape
    T = response_len
    P = L - T
    targets = input_ids[:, P:]  # (B, T)
    position_ids = position_ids_from_mask(attention_mask)
    temp = temperature
    if isinstance(temp, Tensor):
        temp = temp.reshape(-1).float()  # (B*T,)
    elif temp is not None and float(temp) == 1.0:
        temp = None
    if fused:
        head = unwrap(model).get_output_embeddings()
        # only real response tokens go through the LM head (padding can be most of a batch of
        # long, ragged responses); results are scattered back to (B, T), 0 on padding
        valid = attention_mask[:, P:].reshape(-1).bool()  # (B*T,)
        idx = valid.nonzero().squeeze(1)

        def fused_head(hidden: Tensor) -> Tensor:  # (B, T+1, d): positions P-1 .. L-1
            hidden = hidden[:, :T, :]  # position P-1+t predicts response token t
            if hidden.dtype != head.weight.dtype:  # e.g. fp32 norm output, autocast on: the
                hidden = hidden.to(head.weight.dtype)  # backward recomputes outside autocast
            lp, en = fused_logprobs_and_entropy(
                hidden.reshape(B * T, -1)[idx],
                head.weight,
                targets.reshape(-1)[idx],
                temperature=temp[idx] if isinstance(temp, Tensor) else temp,
                chunk_size=chunk_size,
                bias=getattr(head, "bias", None),
                compute_entropy=entropy,
            )
            return torch.stack([lp, en] if entropy else [lp])  # (2 or 1, N), not a view

        with _head_forward(head, fused_head):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=T + 1,
            )
        res = out.logits.float()  # (2 or 1, N)
        lp = res[0]
        logp = lp.new_zeros(B * T).index_copy(0, idx, lp).view(B, T)
        ent = lp.new_zeros(B * T).index_copy(0, idx, res[1]).view(B, T) if entropy else None
        return logp, ent
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    logits = out.logits[:, P - 1 : L - 1, :]  # (B, T, V)
    t = temperature
    if isinstance(t, Tensor):
        t = t.float()
    logp, ent = logprobs_and_entropy(logits, targets, temperature=t, chunk_size=chunk_size)
    return logp, (ent if entropy else None)


def rollout_entropy(
    model,
    prompt_ids: list[list[int]],
    batch,  # RolloutBatch: row b answers prompt_ids[batch.prompt_index[b]]
    pad_id: int,
    micro_batch: int = 64,
) -> Tensor:
    """(B, T) untempered entropy of every response token of `batch`, from `model` (0 on padding).

    For engines that record no decode-time entropy (vLLM): the same forward pass the learner's
    old-policy scoring runs, so evaluation and training see the same numbers."""
    import torch

    rows_out = []
    T = batch.response_ids.shape[1]
    device = next(model.parameters()).device
    for s in range(0, len(batch), micro_batch):
        idx = list(range(s, min(s + micro_batch, len(batch))))
        prompts = [prompt_ids[int(batch.prompt_index[i])] for i in idx]
        P = max(len(p) for p in prompts)
        ids = torch.full((len(idx), P + T), pad_id, dtype=torch.long)
        am = torch.zeros((len(idx), P + T), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
            am[j, P - len(p) : P] = 1
        mask = batch.response_mask[idx].bool()
        ids[:, P:] = batch.response_ids[idx].long().masked_fill(~mask, pad_id)
        am[:, P:] = mask.long()
        with torch.no_grad():
            _, ent = response_logprobs(model, ids.to(device), am.to(device), T, None)
        rows_out.append(ent.float().cpu().masked_fill(~mask, 0.0))
    return torch.cat(rows_out)
