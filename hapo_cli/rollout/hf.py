"""Rollouts with the learner's own transformers model: a hand-written KV-cache decode loop.

Why not `model.generate`: per step we keep only the sampled token's log-prob, its temperature
T_t and the untempered entropy (three (N,) vectors), never the [T, N, V] scores, and sampling
draws from one seeded `torch.Generator`, so the same seed gives the same batch (and a resumed run
samples exactly what the original would have).

One step (N rows of a chunk):
    logits (N, V) untempered, float32
    scaled = logits / T_t                      AdaptiveTemperatureLogitsProcessor (first in list)
    warped = top_k(top_p(scaled))              transformers warpers, -inf outside the support
    y ~ softmax(warped)                        (greedy: argmax logits)
    logp = log_softmax(scaled)[y]              BEFORE truncation: what the learner recomputes

The fast path (`KVStepper`, Qwen2/Qwen3/Llama with SDPA attention): the prompt goes through the
model's own forward once (prefill); each new token then runs the model's own submodules (embedding,
rotary embedding, norms, projections, MLPs, transformers' SDPA attention function, LM head) in the
order the model's forward runs them, against a KV cache preallocated for the whole response. It
skips what the model's forward does around them on every token: building the attention mask, the
cache objects' concatenation (a copy of the whole cache per token), the output dataclasses. The
same arithmetic on the same shapes, so the logits equal the generic path's on a fixed machine
(tests/test_rollout_fast.py compares them); any other model, attention implementation or rope
scaling runs the generic path (`model(...)` with the model's own cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList

from hapo_cli.algo import EntropyStats
from hapo_cli.tensors import left_pad_prompts, position_ids

from .base import LearnerModuleEngine, RolloutBatch, SamplingSpec, check_prompts, clean_param_name
from .processors import sampling_processors


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_special_ids(
    model: nn.Module,
    tokenizer: Any,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[list[int], int]:
    """(eos ids, pad id): explicit values, else the model's generation config, else the tokenizer.
    The pad id falls back to the first eos id."""
    eos = _as_id_list(eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    if not eos and gen_cfg is not None:
        eos = _as_id_list(gen_cfg.eos_token_id)
    if not eos and tokenizer is not None:
        eos = _as_id_list(getattr(tokenizer, "eos_token_id", None))
    if not eos:
        eos = _as_id_list(getattr(getattr(model, "config", None), "eos_token_id", None))
    if not eos:
        raise ValueError("HFEngine: no eos token id (model generation_config, tokenizer, config)")
    pad = pad_token_id
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and gen_cfg is not None:
        pad = gen_cfg.pad_token_id
    if pad is None:
        pad = eos[0]
    return eos, int(pad)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(input_ids, attention_mask, position_ids), each (N, P), prompts right-aligned.

    position_ids count real tokens only (0 at each prompt's first token), so absolute-position
    models see the same positions as an unpadded prompt; pads get position 0.
    """
    ids, mask = left_pad_prompts(prompts, pad_id)
    return ids.to(device), mask.to(device), position_ids(mask).to(device)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; older versions
    `past_key_values` (still accepted, with a deprecation warning per call)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


FAST_DECODE_MODEL_TYPES = ("qwen2", "qwen3", "llama")


def fast_decode_supported(model: nn.Module) -> bool:
    """True when `KVStepper` reproduces `model`'s decode step: a Qwen2/Qwen3/Llama causal LM with
    SDPA attention, plain rope (no dynamic/scaled variants), no sliding window and no hooks (FSDP
    or ZeRO-3 gather parameters in hooks on the whole model; run those through the model)."""
    cfg = getattr(model, "config", None)
    core = getattr(model, "model", None)
    if cfg is None or core is None or getattr(cfg, "model_type", None) not in FAST_DECODE_MODEL_TYPES:
        return False
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "layer_types", None) and any(
        t != "full_attention" for t in cfg.layer_types
    ):
        return False
    for part in ("embed_tokens", "rotary_emb", "norm", "layers"):
        if not hasattr(core, part):
            return False
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        return False
    hooked = [m for m in (model, core) if m._forward_hooks or m._forward_pre_hooks]
    return not hooked


class KVStepper:
    """One decode step of a Qwen2/Qwen3/Llama model over a preallocated KV cache.

    Built from the prefill's cache (the model's own forward over the prompts); `step(tokens,
    positions)` feeds one token per row and returns the (N, V) float32 logits of the next one. The
    ops, their order and their shapes are those of the model's decoder layer for one new token
    (see the module docstring); only the cache storage differs (a slice of one buffer instead of a
    tensor concatenated per token). `attention_mask` (N, P) is the prompts' padding mask; new
    tokens are attended by every row, as in the generic loop.
    """

    def __init__(self, model: nn.Module, cache: Any, attention_mask: Tensor, max_new: int):
        import sys

        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        hf: Any = model  # a transformers causal LM whose parts `fast_decode_supported` checked
        self.core = hf.model
        self.head = hf.get_output_embeddings()
        self.attention = sdpa_attention_forward
        layers = list(self.core.layers)
        self.layers = layers
        self.rope = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
        n, p = attention_mask.shape
        self.length = p  # positions filled so far
        self.keys, self.values = [], []
        for i in range(len(layers)):
            k, v = _cache_layer(cache, i)  # (N, H_kv, P, D) each
            kb = k.new_empty((n, k.shape[1], p + max_new, k.shape[3]))
            vb = v.new_empty((n, v.shape[1], p + max_new, v.shape[3]))
            kb[:, :, :p] = k
            vb[:, :, :p] = v
            self.keys.append(kb)
            self.values.append(vb)
        # the model passes no mask when no prompt is padded, else the boolean padding mask
        self.padded = not bool(attention_mask.bool().all())
        self.mask = torch.ones((n, p + max_new), dtype=torch.bool, device=attention_mask.device)
        self.mask[:, :p] = attention_mask.bool()

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (N,) long, positions (N,) long -> logits (N, V) float32 for the next token."""
        n, L = tokens.shape[0], self.length + 1
        hidden = self.core.embed_tokens(tokens.unsqueeze(1))  # (N, 1, d)
        cos, sin = self.core.rotary_emb(hidden, positions.unsqueeze(1))
        mask = self.mask[:, None, None, :L] if self.padded else None  # (N, 1, 1, L)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            shape = (n, 1, -1, attn.head_dim)
            q = attn.q_proj(hidden).view(shape)
            k = attn.k_proj(hidden).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (N, H, 1, D)
            v = attn.v_proj(hidden).view(shape).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.keys[i][:, :, L - 1 : L] = k
            self.values[i][:, :, L - 1 : L] = v
            out, _ = self.attention(
                attn, q, self.keys[i][:, :, :L], self.values[i][:, :, :L], mask,
                dropout=0.0, scaling=attn.scaling, sliding_window=None,
            )  # (N, 1, H, D)
            hidden = residual + attn.o_proj(out.reshape(n, 1, -1).contiguous())
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length = L
        hidden = self.core.norm(hidden)
        return self.head(hidden)[:, -1, :].float()


def _cache_layer(cache: Any, i: int) -> tuple[Tensor, Tensor]:
    """(keys, values) of layer i of a transformers cache (5.x `layers[i]`, older `key_cache`)."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _unwrap(model: nn.Module, accelerator: Any = None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / DataParallel
    return model


_M32 = 0xFFFFFFFF


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32). Products may
    wrap past 2^63; masking keeps the exact low 32 bits, so the hash is platform independent."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def global_prompt_index(prompt_offset: int | Sequence[int], num_prompts: int) -> Tensor:
    """(num_prompts,) global index of each prompt: offset + i, or the given indices."""
    if isinstance(prompt_offset, int):
        return torch.arange(num_prompts, dtype=torch.long) + int(prompt_offset)
    idx = torch.as_tensor(list(prompt_offset), dtype=torch.long)
    if idx.shape != (num_prompts,):
        raise ValueError(f"prompt_offset: {idx.numel()} indices for {num_prompts} prompts")
    return idx


def sample_keys(seed: int, prompt_offset: int | Sequence[int], num_prompts: int, n: int) -> Tensor:
    """(num_prompts * n,) int64 key of each sample: a hash of (seed, global prompt index, j)."""
    prompt = global_prompt_index(prompt_offset, num_prompts)
    j = torch.arange(n, dtype=torch.long)
    s = _fmix32(torch.tensor(int(seed) & _M32, dtype=torch.long))
    k = _fmix32(s ^ _fmix32(prompt & _M32))[:, None]  # (P, 1)
    k = _fmix32((k + (j[None, :] + 1) * 0x9E3779B9) & _M32)  # (P, n)
    return k.reshape(-1)


def gumbel_sample(warped: Tensor, keys: Tensor, step: int) -> Tensor:
    """Sample one token per row from softmax(warped) by the Gumbel-max trick, with noise that
    is a pure function of (row key, step, token id): argmax(warped + G), G ~ Gumbel(0, 1).
    Equivalent in distribution to `torch.multinomial(softmax(warped), 1)`; -inf logits (top-k /
    top-p filtered) are never chosen. warped (N, V), keys (N,) -> (N,)."""
    return (warped.double() + gumbel_noise(keys, step, warped.shape[-1])).argmax(dim=-1)


def gumbel_noise(keys: Tensor, step: int, vocab_size: int) -> Tensor:
    """(N, V) float64 Gumbel(0, 1) noise of `gumbel_sample`: a pure function of (key, step, id)."""
    step_key = _fmix32((keys ^ ((step + 1) * 0x27D4EB2F & _M32)) & _M32)  # (N,)
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.long) * 0x165667B1  # (V,)
    bits = _fmix32((step_key[:, None] + vocab[None, :]) & _M32)  # (N, V) uniform 32-bit ints
    u = (bits.double() + 0.5) / 4294967296.0  # (N, V) in (0, 1)
    return -torch.log(-torch.log(u))


class HFEngine(LearnerModuleEngine):
    """`RolloutEngine` over a transformers causal LM (the learner's model object, unwrapped).

    Sequences are processed in chunks of `batch_size` (a prompt's n copies are adjacent, so a
    chunk boundary may split a group; it changes nothing but memory). The model is put in eval
    mode under `torch.inference_mode` and its train/eval mode restored afterwards.
    Under FSDP/ZeRO-3 the learner must hand over a model whose full parameters are available
    (e.g. inside `summon_full_params`); DDP and single-process models work as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        batch_size: int = 256,
        accelerator: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"HFEngine: batch_size={batch_size} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.accelerator = accelerator
        # False: always the generic loop (the model's own forward and cache every token)
        self.fast_decode = bool(fast_decode)
        self.eos_ids, self.pad_id = resolve_special_ids(
            _unwrap(model, accelerator), tokenizer, eos_token_id, pad_token_id
        )

    # ---- RolloutEngine ----------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[list[int]],
        spec: SamplingSpec,
        stats: EntropyStats | None = None,
        seed: int = 0,
        prompt_offset: int | Sequence[int] = 0,
    ) -> RolloutBatch:
        """Sample `spec.n` responses per prompt. The randomness of sample j of prompt i is a
        function of (seed, global index of prompt i, j) only, so the result does not depend on
        how the prompts are chunked or sharded across ranks. `prompt_offset`: the global index
        of the first prompt (contiguous shards) or one global index per prompt."""
        check_prompts(prompt_ids)
        model = _unwrap(self.model, self.accelerator)
        device = next(model.parameters()).device
        seqs = [list(p) for p in prompt_ids for _ in range(spec.n)]  # (B,) prompt i's n adjacent
        row_keys = sample_keys(seed, prompt_offset, len(prompt_ids), spec.n).to(device)  # (B,)
        was_training = model.training
        model.eval()
        parts = []
        try:
            with torch.inference_mode(), self._autocast():
                for start in range(0, len(seqs), self.batch_size):
                    chunk = seqs[start : start + self.batch_size]
                    keys = row_keys[start : start + self.batch_size]
                    parts.append(self._decode_chunk(model, chunk, spec, stats, keys, device))
        finally:
            model.train(was_training)
        return self._assemble(parts, len(prompt_ids), spec)

    def sync_weights(self, weights: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        """No-op when `weights` is (a wrapper of) the engine's own model; otherwise copies a
        module's state dict, or (name, tensor) pairs, into the engine's model."""
        target = _unwrap(self.model, self.accelerator)
        if isinstance(weights, nn.Module):
            source = _unwrap(weights, self.accelerator)
            if source is target:
                return
            target.load_state_dict(source.state_dict())
            return
        params = dict(target.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                key = clean_param_name(name)
                if key not in params:
                    raise KeyError(f"HFEngine.sync_weights: unknown parameter {name!r}")
                params[key].copy_(tensor)

    def sync_from(self, model: nn.Module, accelerator: Any = None) -> None:
        """No-op when the engine samples with `model` itself; else (an FSDP2 learner's
        unsharded copy) its full parameters, gathered on every rank, are copied in."""
        if _unwrap(model, accelerator) is _unwrap(self.model, self.accelerator):
            return
        from ..sharded import full_named_parameters

        self.sync_weights(full_named_parameters(model, accelerator))

    def _autocast(self):
        """The autocast the learner's forward runs under (accelerate wraps the prepared model's
        `forward` in it; with `train.mixed_precision=bf16` or `model.dtype=bfloat16` the fp32
        master weights compute in bf16). `KVStepper` calls the model's submodules directly, so
        the whole decode runs under it too: without it the prefill's cache holds bf16 values and
        fp32 keys, and the fast step computes in fp32 what the generic loop computes in bf16."""
        if self.accelerator is None:
            return nullcontext()
        return self.accelerator.autocast()

    def sleep(self) -> None:
        """Nothing to free: the engine owns no memory beyond the learner's model."""

    def wake_up(self) -> None:
        """Nothing to restore (see `sleep`)."""

    # ---- decoding ---------------------------------------------------------------------------

    def _decode_chunk(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        spec: SamplingSpec,
        stats: EntropyStats | None,
        keys: Tensor,  # (N,) int64 per-sequence keys from `sample_keys`
        device: torch.device,
    ) -> dict[str, Tensor]:
        n, t_max = len(prompts), spec.max_new_tokens
        ids, attn, pos = left_pad(prompts, self.pad_id, device)  # (N, P) each
        if spec.greedy:
            temp_proc, chain = sampling_processors(1.0, 0.0, None, 0, 1.0)
        else:
            tau = spec.tau if spec.adaptive else 0.0
            temp_proc, chain = sampling_processors(
                spec.temperature, tau, stats if spec.adaptive else None, spec.top_k, spec.top_p
            )
        truncate = LogitsProcessorList(chain[1:])  # top-k / top-p after the temperature
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)

        tokens = torch.full((n, t_max), self.pad_id, dtype=torch.long, device=device)
        logp = torch.zeros((n, t_max), dtype=torch.float32, device=device)
        temps = torch.zeros_like(logp)
        ents = torch.zeros_like(logp)
        # under A, also the log-prob at the base T: the learner's old log-prob when it scores
        # at the base temperature (policy_temperature: base), so it need not rescore the batch
        base_t = spec.temperature if spec.uses_adaptive_temperature else None
        base_lp = torch.zeros_like(logp) if base_t is not None else None
        done = torch.zeros(n, dtype=torch.bool, device=device)
        hit_eos = torch.zeros_like(done)
        length = torch.zeros(n, dtype=torch.long, device=device)
        cache_kw = _cache_kwarg(model)

        out = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        cache = _cache_of(out)
        next_pos = pos[:, -1] + 1  # (N,)
        logits = out.logits[:, -1, :].float()  # (N, V)
        stepper = (KVStepper(model, cache, attn, t_max)
                   if self.fast_decode and t_max > 1 and fast_decode_supported(model) else None)
        for t in range(t_max):
            # input_ids: the prompts only (no processor in the chain reads them; growing the
            # history every step would cost a copy per token)
            scaled = temp_proc(ids, logits)  # (N, V) logits / T_t (float32 in, float32 out)
            # (transformers types input_ids as torch.LongTensor, a class no tensor is typed as)
            warped = (truncate(ids, scaled)  # pyright: ignore[reportArgumentType]
                      if len(truncate) else scaled)  # top-k/top-p: -inf
            step_temps = temp_proc.last_temperature  # (N,)
            assert step_temps is not None and temp_proc.last_entropy is not None  # set by the call
            if spec.greedy:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = gumbel_sample(warped, keys, t)  # (N,)
            active = ~done
            nxt = torch.where(active, nxt, torch.full_like(nxt, self.pad_id))
            step_logp = torch.log_softmax(scaled, dim=-1).gather(1, nxt.unsqueeze(1)).squeeze(1)
            zero = torch.zeros_like(step_logp)
            tokens[:, t] = nxt
            logp[:, t] = torch.where(active, step_logp, zero)
            temps[:, t] = torch.where(active, step_temps, zero)
            ents[:, t] = torch.where(active, temp_proc.last_entropy, zero)
            if base_lp is not None and base_t is not None:  # both or neither
                at_base = logits if base_t == 1.0 else logits / base_t  # as the learner divides
                step_base = torch.log_softmax(at_base, dim=-1).gather(1, nxt.unsqueeze(1))
                base_lp[:, t] = torch.where(active, step_base.squeeze(1), zero)
            length += active.long()
            is_eos = active & torch.isin(nxt, eos)
            hit_eos |= is_eos
            done |= is_eos
            if t == t_max - 1 or bool(done.all()):
                break
            if stepper is not None:
                logits = stepper.step(nxt, next_pos)  # (N, V)
                next_pos = next_pos + 1
                continue
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out = model(
                input_ids=nxt.unsqueeze(1),
                attention_mask=attn,
                position_ids=next_pos.unsqueeze(1),
                use_cache=True,
                **{cache_kw: cache},
            )
            cache = _cache_of(out)
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :].float()
        out = {
            "tokens": tokens,
            "logp": logp,
            "temps": temps,
            "ents": ents,
            "length": length,
            "hit_eos": hit_eos,
        }
        if base_lp is not None:
            out["base_logp"] = base_lp
        return out

    def _assemble(self, parts: list[dict[str, Tensor]], num_prompts: int, spec: SamplingSpec):
        width = max(int(p["length"].max()) for p in parts)
        width = max(width, 1)
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        length = cat["length"].cpu()
        mask = torch.arange(width).unsqueeze(0) < length.unsqueeze(1)  # (B, T)
        hit_eos = cat["hit_eos"].cpu()
        return RolloutBatch(
            prompt_index=torch.arange(num_prompts).repeat_interleave(spec.n),
            response_ids=cat["tokens"][:, :width].cpu(),
            response_mask=mask,
            behaviour_logp=cat["logp"][:, :width].cpu(),
            temperature=cat["temps"][:, :width].cpu(),
            entropy=cat["ents"][:, :width].cpu(),
            finish_reason=["eos" if e else "length" for e in hit_eos.tolist()],
            response_len=length,
            pad_token_id=self.pad_id,
            truncation=spec.truncation,
            logp_includes_truncation=False,
            decode_stats=True,
            base_logp=cat["base_logp"][:, :width].cpu() if "base_logp" in cat else None,
        )
