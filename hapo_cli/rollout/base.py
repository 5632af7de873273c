"""Rollout contract: what is sampled (`SamplingSpec`), what comes back (`RolloutBatch`), who samples
(`RolloutEngine`), and `build_engine`, which picks the engine named by the recipe.

Glossary (as in `hapo_cli.algo`): P prompts, G = n samples per prompt, B = P * G responses,
T response tokens (the longest response of the batch), V vocabulary.

Log-prob convention. `behaviour_logp[b, t]` is `log_softmax(logits_t / T_t)[y_t]`, with `logits_t`
the untempered logits and `T_t` the temperature actually used for that token (the base T, or the
adaptive `T_t = T (1 + tau clamp(h_t, -1, 1))` of component A). It is taken BEFORE top-k/top-p
truncation, which is exactly what the learner recomputes from its own forward pass; when
truncation was active the sampled token came from the renormalised truncated distribution, so the
stored value is then a (slightly lower) log-prob of the untruncated tempered policy. The HF engine
follows this convention always; vLLM returns the log-prob after its own truncation
(`logp_includes_truncation` says which one a batch holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from hapo_cli.algo import EntropyStats
from hapo_cli.sections import AlgoConfig

if TYPE_CHECKING:
    from hapo_cli.recipe import RolloutConfig

FINISH_REASONS = ("eos", "length")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one batch: G = `n` responses per prompt.

    `temperature` is the base T; `adaptive` turns on component A (per-token `T_t` from the token's
    entropy and the previous step's entropy stats, scale `tau`). `top_k=0` and `top_p=1.0` mean
    off. `greedy` ignores temperature/top-k/top-p and takes the argmax (behaviour log-probs are then
    at T = 1, and the stored temperature is 1).
    """

    n: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    greedy: bool = False
    adaptive: bool = False
    tau: float = AlgoConfig.model_fields["tau"].default  # A's scale: the recipe's default

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n={self.n} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"SamplingSpec.temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSpec.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.tau < 0:
            raise ValueError(f"SamplingSpec.tau={self.tau} must be >= 0")

    @property
    def truncation(self) -> bool:
        """True when top-k or top-p removes part of the distribution (never under greedy)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def uses_adaptive_temperature(self) -> bool:
        return self.adaptive and not self.greedy

    @classmethod
    def for_training(cls, rollout: RolloutConfig, algo: AlgoConfig) -> SamplingSpec:
        """The training rollout of a recipe: `rollout.*` plus A's switch and tau from `algo`."""
        return cls(
            n=rollout.n,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=rollout.max_new_tokens,
            adaptive=algo.adaptive_temperature,
            tau=algo.tau,
        )


@dataclass
class RolloutBatch:
    """B = P * G sampled responses; a prompt's G samples are adjacent rows.

    prompt_index    (B,) long   index into the prompt list given to `generate`
    response_ids    (B, T) long right-padded with `pad_token_id`
    response_mask   (B, T) bool valid response tokens, INCLUDING the EOS token when produced
    behaviour_logp  (B, T) f32  log_softmax(logits / T_t)[token] (see the module docstring)
    temperature     (B, T) f32  T_t used for the token (NaN where the engine cannot know it)
    entropy         (B, T) f32  entropy (nats) of the UNTEMPERED distribution at decode time
                                (NaN where the engine cannot know it)
    finish_reason   list[str]   "eos" | "length"
    response_len    (B,) long   = response_mask.sum(-1)
    truncation      bool        top-k/top-p was active while sampling
    logp_includes_truncation bool  behaviour_logp is under the truncated, renormalised
                                distribution (vLLM) rather than before truncation (HF)
    decode_stats    bool        temperature and entropy were recorded at decode time; False for
                                vLLM, whose outputs carry neither: call `with_decode_stats` with
                                the learner's entropies
    base_logp       (B, T) f32  or None: log_softmax(logits / T)[token] at the BASE temperature
                                T, before truncation, recorded by the HF engine under component A
                                (where T_t != T): the old log-prob of `policy_temperature: base`.
                                None where not recorded (without A it equals behaviour_logp)
    Padding positions hold 0 in the float tensors (NaN never leaks into masked sums).
    """

    prompt_index: Tensor
    response_ids: Tensor
    response_mask: Tensor
    behaviour_logp: Tensor
    temperature: Tensor
    entropy: Tensor
    finish_reason: list[str]
    response_len: Tensor
    pad_token_id: int = 0
    truncation: bool = False
    logp_includes_truncation: bool = False
    decode_stats: bool = True
    base_logp: Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.response_ids.shape
        for name in ("response_mask", "behaviour_logp", "temperature", "entropy", "base_logp"):
            if getattr(self, name) is None and name == "base_logp":
                continue
            shape = tuple(getattr(self, name).shape)
            if shape != (b, t):
                raise ValueError(f"RolloutBatch.{name} has shape {shape}, expected {(b, t)}")
        for name in ("prompt_index", "response_len"):
            shape = tuple(getattr(self, name).shape)
            if shape != (b,):
                raise ValueError(f"RolloutBatch.{name} has shape {shape}, expected {(b,)}")
        if len(self.finish_reason) != b:
            raise ValueError(
                f"RolloutBatch.finish_reason has {len(self.finish_reason)} entries, expected {b}"
            )
        bad = sorted(set(self.finish_reason) - set(FINISH_REASONS))
        if bad:
            raise ValueError(
                f"RolloutBatch.finish_reason has {bad}, expected one of {FINISH_REASONS}"
            )

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def response_token_lists(self) -> list[list[int]]:
        """The valid response token ids of each row (EOS included when produced)."""
        return [
            ids[: int(n)].tolist()
            for ids, n in zip(self.response_ids.cpu(), self.response_len.cpu(), strict=True)
        ]

    def decode(self, tokenizer: Any, skip_special_tokens: bool = True) -> list[str]:
        """Response texts via `tokenizer.batch_decode` (EOS dropped when `skip_special_tokens`)."""
        return tokenizer.batch_decode(
            self.response_token_lists(), skip_special_tokens=skip_special_tokens
        )

    def with_decode_stats(
        self,
        entropy: Tensor,
        base_temperature: float,
        tau: float,
        stats: EntropyStats | None,
        adaptive: bool = True,
    ) -> RolloutBatch:
        """Fill `entropy` and `temperature` from the learner's entropies (engines without
        `decode_stats`, i.e. vLLM). entropy (B, T): untempered entropy of each response token,
        recomputed from the learner's logits; temperature = `recompute_adaptive_temperature`
        (plain T when `adaptive` is False or stats is None). Masked positions become 0."""
        if entropy.shape != self.response_ids.shape:
            raise ValueError(
                f"with_decode_stats: entropy has shape {tuple(entropy.shape)}, expected "
                f"{tuple(self.response_ids.shape)}"
            )
        ent, temps = decode_stats_from_entropy(
            entropy.to(self.response_ids.device), self.response_mask, base_temperature,
            tau if adaptive else 0.0, stats,
        )
        return replace(self, entropy=ent, temperature=temps, decode_stats=True)


def decode_stats_from_entropy(
    entropy: Tensor,  # (B, T) untempered entropy of each response token, from the learner
    mask: Tensor,  # (B, T) bool valid response tokens
    base_temperature: float,
    tau: float,  # 0: no A
    stats: EntropyStats | None,
    pad_temperature: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(entropy, T_t), (B, T): the decode stats an engine that records none (vLLM) leaves to the
    learner, the one place they are filled (evaluation's `with_decode_stats`, the learner's
    old-policy pass). Entropy 0 on padding; T_t from `recompute_adaptive_temperature`,
    `pad_temperature` on padding (the learner divides by it: 1 there)."""
    ent = entropy.detach().float()
    temps = recompute_adaptive_temperature(ent, base_temperature, tau, stats)
    return ent.masked_fill(~mask, 0.0), temps.masked_fill(~mask, pad_temperature)


def recompute_adaptive_temperature(
    entropy: Tensor, base_temperature: float, tau: float, stats: EntropyStats | None
) -> Tensor:
    """T_t from an entropy tensor of any shape: `hapo_cli.algo.temperature_from_entropy`, the
    map `adaptive_temperature` applies at decode time. Used where the entropy comes from
    elsewhere than the decode-time logits (vLLM rollouts: the learner's recomputed entropy,
    which matches the engine's up to numerics)."""
    from ..algo.entropy import temperature_from_entropy

    return temperature_from_entropy(entropy, float(base_temperature), tau, stats)


# Segments that wrappers insert into parameter names: DDP/DataParallel ("module."), torch.compile
# ("_orig_mod."), FSDP1 ("_fsdp_wrapped_module."), activation checkpointing
# ("_checkpoint_wrapped_module."). The underlying HF model's names are what remains.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module")


def clean_param_name(name: str) -> str:
    """The HF parameter name under wrappers: 'module._orig_mod.model.x' -> 'model.x'.

    Only whole dotted segments equal to a wrapper name are dropped ('model.mlp.module_x' and a
    submodule that is really called 'module' deeper than the leading wrappers are kept).
    """
    parts = name.split(".")
    while parts and parts[0] in WRAPPER_SEGMENTS:
        parts = parts[1:]
    parts = [p for p in parts if p not in WRAPPER_SEGMENTS[:3]]
    return ".".join(parts)


def check_prompts(prompt_ids: Sequence[Sequence[int]]) -> None:
    """ValueError naming the first bad prompt (engines call it at their entry point)."""
    if len(prompt_ids) == 0:
        raise ValueError("generate: prompt_ids is empty; pass at least one prompt")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (0 tokens)")


def pad_right(rows: Sequence[Sequence[Any]], fill: Any, dtype: torch.dtype) -> Tensor:
    """(len(rows), max_len) tensor, rows left-aligned, padded with `fill` (max_len >= 1)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


class EngineCapabilities:
    """What an engine can do, as properties the learner asks (never its class or name).

    samples_with_learner_module  it samples with the learner's own module (the HF engine): its
                                 decode-time log-probs can be the old log-probs
                                 (`learner/oldlogp.py`), and it needs full parameters per rank
    push_before_first_rollout    it may start from other weights than the learner's (servers)

    The defaults are a separate engine loaded from disk (colocated vLLM).
    """

    samples_with_learner_module = False
    push_before_first_rollout = False

    def close(self) -> None:
        """Release what the engine started (servers); the default has nothing to release."""


class LearnerModuleEngine(EngineCapabilities):
    """The capabilities of an engine that samples with the learner's module (HF)."""

    samples_with_learner_module = True


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses for the learner; the HF engine, the colocated vLLM
    engine and the vLLM-server engine implement it; `EngineCapabilities` lists what the learner
    may ask one."""

    samples_with_learner_module: bool
    push_before_first_rollout: bool

    def generate(
        self,
        prompt_ids: list[list[int]],
        spec: SamplingSpec,
        stats: EntropyStats | None,
        seed: int,
        prompt_offset: int | Sequence[int] = 0,
    ) -> RolloutBatch:
        """B = len(prompt_ids) * spec.n responses; the same seed gives the same batch. Sample j of
        prompt i depends only on (seed, global prompt index, j): `prompt_offset` is the global
        index of the first prompt or one index per prompt, so sharding changes nothing."""
        ...

    def sync_weights(self, weights: torch.nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        """Make the engine sample from the learner's current weights."""
        ...

    def sync_from(self, model: torch.nn.Module, accelerator: Any = None) -> None:
        """Make the engine sample from `model`'s current weights after an update. Every rank
        calls it: a sharded model's parameters are gathered (`hapo_cli.sharded`); an engine
        that samples with `model` itself has nothing to do."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (no-op where nothing is held)."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` before the next `generate`."""
        ...

    def close(self) -> None:
        """Stop what the engine started (local servers); called once when the run ends."""
        ...
