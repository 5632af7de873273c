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

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel

from ..algo import fused_logprobs_and_entropy, logprobs_and_entropy
from ..errors import HapoError
from ..tensors import left_pad_prompts, position_ids
from .tied_grad import TiedGradient, hold_head_gradient, plain_tied_embedding, tied_lookup


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The HF model under the strategy's wrappers (DDP, DeepSpeed: their `.module`)."""
    while hasattr(model, "module"):
        model = cast(nn.Module, model.module)
    return cast(PreTrainedModel, model)


@contextmanager
def _head_forward(model: nn.Module, head, fn):
    """Within the block, calling `head` (hooks included) runs `fn(hidden, weight)` as its
    forward. With tied plain embeddings the lookup's gradient is added into the head's in place
    (tied_grad.py: one (V, d) gradient fewer at the embedding's backward)."""
    emb = plain_tied_embedding(unwrap(model), head)
    channel = TiedGradient()

    def forward(hidden: Tensor) -> Tensor:
        return fn(hidden, head.weight if emb is None else hold_head_gradient(head.weight, channel))

    head.forward = forward  # an instance attribute shadows the class's forward
    try:
        with nullcontext() if emb is None else tied_lookup(emb, channel):
            yield
    finally:
        del head.forward


# attention implementations that keep packed sequences apart, given only position ids:
# transformers' masking_utils builds a block-diagonal causal mask from them (sdpa, eager,
# flex) or the flash-attention kernels run varlen from them
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4", "flex_attention")


@dataclass
class Packed:
    """A micro-batch as one row of real tokens (N of them; N_r of them response tokens)."""

    input_ids: Tensor  # (1, N) each row's prompt then response, padding dropped
    position_ids: Tensor  # (1, N) 0 at each sequence's first token
    predict_at: Tensor  # (N_r,) packed index of the hidden state predicting each response token
    targets: Tensor  # (N_r,) the response tokens, row-major (row b's tokens in order)
    response_mask: Tensor  # (B, T) bool: where the N_r results go


def pack_rows(input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Packed:
    """(B, P+T) left-padded prompt | right-padded response rows -> one packed row.

    Response token t of row b sits at packed index start_b + p_b + t (start_b: where row b
    begins, p_b: its prompt length) and is predicted by the hidden state just before it; every
    row needs a non-empty prompt, so that index is inside its own sequence."""
    B, L = input_ids.shape
    P = L - response_len
    keep = attention_mask.bool()  # (B, P+T)
    lens = keep.sum(-1)  # (B,)
    prompt_len = keep[:, :P].sum(-1)  # (B,)
    resp = keep[:, P:]  # (B, T)
    if bool(((prompt_len == 0) & resp.any(-1)).any()):
        raise ValueError("pack_rows: a row with a response has an empty prompt")
    starts = lens.cumsum(0) - lens  # (B,)
    t = torch.arange(response_len, device=input_ids.device)
    predict_at = (starts[:, None] + prompt_len[:, None] + t[None, :] - 1)[resp]  # (N_r,)
    pos = position_ids(keep)[keep]  # (N,) restarts at 0 for every row
    return Packed(input_ids[keep][None], pos[None], predict_at, input_ids[:, P:][resp], resp)


def check_packing(model) -> None:
    """Refuse, in one line, a model whose attention cannot keep packed sequences apart."""
    cfg = getattr(unwrap(model), "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        name = getattr(cfg, "model_type", type(unwrap(model)).__name__)
        raise HapoError(f"train.packing: model {name} with attn_implementation={impl!r} cannot "
                         f"pack sequences (supported: {', '.join(PACKING_ATTENTION)}); set "
                         "train.packing=false")


VARLEN = "hapo_varlen_sdpa"


def varlen_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Causal SDPA within each packed sequence: q (1, H, N, D), k/v (1, H_kv, N, D) ->
    ((1, N, H, D), None), as a transformers attention function.

    Sequences start where `position_ids` is 0. What flash-attention's varlen kernel does on GPUs:
    the cost is sum_i L_i^2, not the N^2 of a dense block-diagonal mask over the packed row
    (transformers' sdpa path for packed rows), and no (N, N) mask is built."""
    pos = kwargs["position_ids"].reshape(-1)  # (N,)
    n = pos.shape[0]
    bounds = (pos == 0).nonzero().flatten().tolist() + [n]
    gqa = key.shape[1] != query.shape[1]
    outs = [torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


@contextmanager
def _varlen_attention(model):
    """Within the block, an sdpa model runs `varlen_sdpa` (registered with transformers'
    AttentionInterface; the mask builder skips names it does not know, so no mask is built).
    Not under gradient checkpointing, whose backward re-runs the forward after the block."""
    core = unwrap(model)
    cfg = getattr(core, "config", None)
    if (getattr(cfg, "_attn_implementation", None) != "sdpa"
            or getattr(core, "is_activation_checkpointing",
                       getattr(core, "is_gradient_checkpointing", False))):
        yield
        return
    assert cfg is not None  # its _attn_implementation is "sdpa"
    AttentionInterface.register(VARLEN, varlen_sdpa)
    cfg._attn_implementation = VARLEN
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"


def _packed_logprobs(model, input_ids, attention_mask, T, temperature, *, fused, chunk_size,
                     entropy) -> tuple[Tensor, Tensor | None]:
    """`response_logprobs` over one packed row (see `pack_rows`)."""
    with _varlen_attention(model):
        return _packed_forward(model, input_ids, attention_mask, T, temperature, fused=fused,
                               chunk_size=chunk_size, entropy=entropy)


def _packed_forward(model, input_ids, attention_mask, T, temperature, *, fused, chunk_size,
                    entropy) -> tuple[Tensor, Tensor | None]:
    pk = pack_rows(input_ids, attention_mask, T)
    B = input_ids.shape[0]
    temp = temperature
    if isinstance(temp, Tensor):
        temp = temp.float()[pk.response_mask]  # (N_r,)
    elif temp is not None and float(temp) == 1.0:
        temp = None
    kw = dict(input_ids=pk.input_ids, position_ids=pk.position_ids, attention_mask=None,
              use_cache=False, logits_to_keep=pk.predict_at)
    if fused:
        head = unwrap(model).get_output_embeddings()
        assert head is not None  # a causal LM has an output head

        def fused_head(hidden: Tensor, weight: Tensor) -> Tensor:  # (1, N_r, d): predicting
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if hidden.dtype != weight.dtype:  # as in the padded path
                hidden = hidden.to(weight.dtype)
            lp, en = fused_logprobs_and_entropy(
                hidden, weight, pk.targets, temperature=temp, chunk_size=chunk_size,
                bias=getattr(head, "bias", None), compute_entropy=entropy,
            )
            return torch.stack([lp, en] if entropy else [lp])  # (2 or 1, N_r)

        with _head_forward(model, head, fused_head):
            res = model(**kw).logits.float()
        lp, en = res[0], (res[1] if entropy else None)
    else:
        logits = model(**kw).logits[0]  # (N_r, V)
        lp, en = logprobs_and_entropy(logits, pk.targets, temperature=temp,
                                      chunk_size=chunk_size)
    T_mask = pk.response_mask
    logp = lp.new_zeros(B, T).masked_scatter(T_mask, lp)
    if not entropy:
        return logp, None
    assert en is not None  # computed whenever it is asked for
    return logp, lp.new_zeros(B, T).masked_scatter(T_mask, en)


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
    packed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log pi(y_t | prompt, y_<t) for the T response tokens, and the entropy of the same
    (tempered) distribution: (B, T) each, float32. `packed`: one padding-free row (`pack_rows`)
    instead of the (B, P+T) padded batch; the same numbers up to float rounding."""
    if packed:
        return _packed_logprobs(model, input_ids, attention_mask, response_len, temperature,
                                fused=fused, chunk_size=chunk_size, entropy=entropy)
    B, L = input_ids.shape
    T = response_len
    P = L - T
    targets = input_ids[:, P:]  # (B, T)
    pos_ids = position_ids(attention_mask)
    temp = temperature
    if isinstance(temp, Tensor):
        temp = temp.reshape(-1).float()  # (B*T,)
    elif temp is not None and float(temp) == 1.0:
        temp = None
    if fused:
        head = unwrap(model).get_output_embeddings()
        assert head is not None  # a causal LM has an output head
        # only real response tokens go through the LM head (padding can be most of a batch of
        # long, ragged responses); results are scattered back to (B, T), 0 on padding
        valid = attention_mask[:, P:].reshape(-1).bool()  # (B*T,)
        idx = valid.nonzero().squeeze(1)

        def fused_head(hidden: Tensor, weight: Tensor) -> Tensor:  # (B, T+1, d): P-1 .. L-1
            hidden = hidden[:, :T, :]  # position P-1+t predicts response token t
            if hidden.dtype != weight.dtype:  # e.g. fp32 norm output, autocast on: the
                hidden = hidden.to(weight.dtype)  # backward recomputes outside autocast
            lp, en = fused_logprobs_and_entropy(
                hidden.reshape(B * T, -1)[idx],
                weight,
                targets.reshape(-1)[idx],
                temperature=temp[idx] if isinstance(temp, Tensor) else temp,
                chunk_size=chunk_size,
                bias=getattr(head, "bias", None),
                compute_entropy=entropy,
            )
            return torch.stack([lp, en] if entropy else [lp])  # (2 or 1, N), not a view

        with _head_forward(model, head, fused_head):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=pos_ids,
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
        position_ids=pos_ids,
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
    rows_out = []
    T = batch.response_ids.shape[1]
    device = next(model.parameters()).device
    for s in range(0, len(batch), micro_batch):
        idx = list(range(s, min(s + micro_batch, len(batch))))
        prompts = [prompt_ids[int(batch.prompt_index[i])] for i in idx]
        p_ids, p_am = left_pad_prompts(prompts, pad_id)  # (b, P) each
        mask = batch.response_mask[idx].bool()
        ids = torch.cat([p_ids, batch.response_ids[idx].long().masked_fill(~mask, pad_id)], 1)
        am = torch.cat([p_am, mask.long()], 1)
        with torch.no_grad():
            _, ent = response_logprobs(model, ids.to(device), am.to(device), T, None)
        assert ent is not None  # entropy=True, the default
        rows_out.append(ent.float().cpu().masked_fill(~mask, 0.0))
    return torch.cat(rows_out)
