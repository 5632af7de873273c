"""Component A as a transformers `LogitsProcessor`.

It divides each row's untempered logits by `T_t = T (1 + tau clamp(h_t, -1, 1))`, computed by the
shared pure function `hapo_cli.algo.apply_adaptive_temperature` (the vLLM plugin calls the same
function, so both engines scale the same logits identically). Put it FIRST in the processor list
and do not add transformers' own `TemperatureLogitsWarper`: this processor already applies the base
temperature. Top-k/top-p warpers go after it.
"""

from __future__ import annotations

from torch import Tensor
from transformers import LogitsProcessor

from hapo_cli.algo import EntropyStats, apply_adaptive_temperature, token_entropy


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """scores (N, V) untempered -> scores / T_t (N, V); records T_t and the entropy of the call.

    `stats` (the previous step's entropy stats) may be replaced between steps; None means plain T.
    After each call `last_temperature` (N,) holds the T_t used and `last_entropy` (N,) the
    entropy (nats, float32) of the UNTEMPERED distribution of each row, so a decode loop can
    store them without keeping the scores.
    """

    def __init__(
        self, temperature: float, tau: float = 0.0, stats: EntropyStats | None = None
    ) -> None:
        if not temperature > 0:
            raise ValueError(
                f"AdaptiveTemperatureLogitsProcessor: temperature={temperature} must be > 0"
            )
        if tau < 0:
            raise ValueError(f"AdaptiveTemperatureLogitsProcessor: tau={tau} must be >= 0")
        self.temperature = float(temperature)
        self.tau = float(tau)
        self.stats = stats
        self.last_temperature: Tensor | None = None
        self.last_entropy: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.dim() != 2:
            raise ValueError(f"expected scores of shape (N, V), got {tuple(scores.shape)}")
        self.last_entropy = token_entropy(scores).float()  # (N,)
        scaled, temps = apply_adaptive_temperature(scores, self.temperature, self.tau, self.stats,
                                                   entropy=self.last_entropy)
        self.last_temperature = temps.float()  # (N,)
        return scaled


def sampling_processors(
    temperature: float, tau: float, stats: EntropyStats | None, top_k: int, top_p: float
) -> tuple[AdaptiveTemperatureLogitsProcessor, list]:
    """(temperature processor, [temperature processor, TopK?, TopP?]) in transformers' order:
    temperature first, then top-k, then top-p (each truncation masks with -inf)."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    temp = AdaptiveTemperatureLogitsProcessor(temperature, tau, stats)
    chain: list = [temp]
    if top_k > 0:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return temp, chain


__all__ = ["AdaptiveTemperatureLogitsProcessor", "sampling_processors"]
