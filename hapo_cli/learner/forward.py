"""Learner forward pass: response-token log-probs and entropy without full fp32 logits.

The model is called through its (possibly DDP/FSDP-wrapped) forward so gradient hooks fire, with
`logits_to_keep=1` so the LM head runs on one position only; the decoder's final hidden states are
captured by a forward hook and fed to the chunked fused LM-head function.
"""

from __future__ import annotations

from contextlib import contextmanager

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
def _capture_decoder_output(decoder):
    box: dict[str, Tensor] = {}

    def hook(_module, _inputs, output):
        box["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


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
        base = unwrap(model)
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
        with _capture_decoder_output(decoder) as box:
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,
            )
        hidden = box["hidden"][:, P - 1 : L - 1, :]  # (B, T, d): position P-1+t predicts token t
        # only real response tokens go through the LM head (padding can be most of a batch of
        # long, ragged responses); results are scattered back to (B, T), 0 on padding
        valid = attention_mask[:, P:].reshape(-1).bool()  # (B*T,)
        idx = valid.nonzero().squeeze(1)
        lp, en = fused_logprobs_and_entropy(
            hidden.reshape(B * T, -1)[idx],
            head.weight,
            targets.reshape(-1)[idx],
            temperature=temp[idx] if isinstance(temp, Tensor) else temp,
            chunk_size=chunk_size,
            bias=getattr(head, "bias", None),
            compute_entropy=entropy,
        )
        logp = lp.new_zeros(B * T).index_copy(0, idx, lp).view(B, T)
        ent = en.new_zeros(B * T).index_copy(0, idx, en).view(B, T) if entropy else None
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
