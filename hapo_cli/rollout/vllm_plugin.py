"""Component A as a vLLM custom logits processor (no patched vLLM), for vLLM 0.31 - 0.33.

Two classes share one pure function (`scale_rows`, which calls
`hapo_cli.algo.apply_adaptive_temperature`, the function the transformers processor calls):

- `HapoAdaptiveTemperature`: Model Runner V2's interface
  (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`), the default runner for dense
  models since 0.31. Per-request state lives in request *slots*: `add_request(slot, params)`,
  `apply(logits, ctx)` with `ctx.idx_mapping_np[row] = slot`.
- `HapoAdaptiveTemperatureV1`: the V1 runner's interface
  (`vllm.v1.sample.logits_processor.LogitsProcessor`), used when `VLLM_USE_V2_MODEL_RUNNER=0` or
  vLLM falls back to V1: `update_state(BatchUpdate)` with added/removed/moved rows, `apply(logits)`.

Order and the effective temperature. Both runners call custom processors on the UNTEMPERED
float32 logits and divide by the request's `SamplingParams.temperature` afterwards (V2: always;
V1: for processors whose `is_argmax_invariant()` is False, which ours returns). So a hapo request
carries `temperature=1.0` and the processor divides by the full `T_t` (base T included): the
effective temperature is exactly `T_t`, with no multiply-then-divide rounding. `validate_params`
rejects a hapo request whose temperature is not 1.0. Top-k/top-p run after the processor, as in
the transformers chain.

Per-request parameters travel in `SamplingParams.extra_args["hapo"]` =
`{"temperature": T, "tau": tau, "stats": EntropyStats.to_dict() or None}`; never batch-global
state, so requests with different stats can share a batch.

Importing this module without vllm works (the classes then derive from `object`), so the
arithmetic and the state bookkeeping are unit-tested on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hapo_cli.algo import EntropyStats, apply_adaptive_temperature

if TYPE_CHECKING:  # vllm is optional (absent from the lint venv); one declaration per base
    from vllm.v1.sample.logits_processor import (  # pyright: ignore[reportMissingImports]
        LogitsProcessor as _V1Base,
    )
    from vllm.v1.worker.gpu.sample.logits_processor import (  # pyright: ignore[reportMissingImports]
        LogitsProcessor as _V2Base,
    )
else:
    try:  # Model Runner V2 interface (vLLM >= 0.31)
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Base
    except ImportError:  # vllm absent (CPU tests) or too old
        _V2Base = object

    try:  # V1 interface
        from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
    except ImportError:
        _V1Base = object

HAPO_KEY = "hapo"


@dataclass(frozen=True)
class HapoRequestParams:
    """Component A's per-request parameters: base T, tau and the previous step's stats."""

    temperature: float
    tau: float
    stats: EntropyStats | None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"extra_args['hapo']['temperature']={self.temperature} must be > 0")
        if self.tau < 0:
            raise ValueError(f"extra_args['hapo']['tau']={self.tau} must be >= 0")

    def to_extra_args(self) -> dict[str, Any]:
        """The JSON-safe dict stored under `SamplingParams.extra_args['hapo']`."""
        return {
            "temperature": float(self.temperature),
            "tau": float(self.tau),
            "stats": None if self.stats is None else self.stats.to_dict(),
        }

    @classmethod
    def from_extra_args(cls, data: Any) -> HapoRequestParams:
        if not isinstance(data, dict):
            raise ValueError(f"extra_args['hapo'] must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"temperature", "tau", "stats"}
        if unknown or "temperature" not in data:
            raise ValueError(
                f"extra_args['hapo'] needs keys temperature, tau, stats; got {sorted(data)}"
            )
        stats = data.get("stats")
        return cls(
            temperature=float(data["temperature"]),
            tau=float(data.get("tau", 0.0)),
            stats=None if stats is None else EntropyStats.from_dict(stats),
        )

    @classmethod
    def from_sampling_params(cls, sampling_params: Any) -> HapoRequestParams | None:
        """The request's hapo params, or None when it does not ask for component A."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        if HAPO_KEY not in extra:
            return None
        return cls.from_extra_args(extra[HAPO_KEY])


def scale_rows(
    logits: Tensor, row_params: Sequence[HapoRequestParams | None]
) -> tuple[Tensor, Tensor]:
    """Divide each row that has params by its T_t, in place; rows without params are untouched.

    logits (N, V) untempered; row_params[i] the params of row i (None: not a hapo request).
    Rows with equal params are scaled in one call of `apply_adaptive_temperature` (the same
    pure function as the transformers processor). Returns (logits, temps (N,) float32, 1.0 on
    untouched rows).
    """
    if logits.dim() != 2 or logits.shape[0] != len(row_params):
        raise ValueError(
            f"scale_rows: logits {tuple(logits.shape)} and {len(row_params)} row params disagree"
        )
    temps = torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    groups: dict[HapoRequestParams, list[int]] = {}
    for row, params in enumerate(row_params):
        if params is not None:
            groups.setdefault(params, []).append(row)
    for params, rows in groups.items():
        idx = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        scaled, t = apply_adaptive_temperature(
            logits.index_select(0, idx), params.temperature, params.tau, params.stats
        )
        logits.index_copy_(0, idx, scaled)
        temps.index_copy_(0, idx, t.float())
    return logits, temps


def _validate(sampling_params: Any) -> None:
    params = HapoRequestParams.from_sampling_params(sampling_params)
    if params is None:
        return
    temperature = getattr(sampling_params, "temperature", 1.0)
    if temperature != 1.0:
        raise ValueError(
            f"a request with extra_args['hapo'] must have SamplingParams.temperature=1.0 (the "
            f"processor applies T_t = {params.temperature} * (1 + tau h)); got {temperature}"
        )


class HapoAdaptiveTemperature(_V2Base):
    """Model Runner V2 logits processor for component A (see the module docstring)."""

    def __init__(self, vllm_config: Any = None, req_states: Any = None) -> None:
        max_reqs = int(getattr(req_states, "max_num_reqs", 0) or 0)
        self._slots: list[HapoRequestParams | None] = [None] * max_reqs
        self._active = 0

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        _validate(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        params = HapoRequestParams.from_sampling_params(sampling_params)
        if req_idx >= len(self._slots):
            self._slots.extend([None] * (req_idx + 1 - len(self._slots)))
        self._slots[req_idx] = params  # overwrites the slot's previous occupant
        return params is not None

    def apply_staged_writes(self) -> None:
        """Nothing staged: the slot table lives on the host."""

    def apply(self, logits: Tensor, ctx: Any) -> Tensor:
        slots = ctx.idx_mapping_np  # (num_reqs,) batch position -> slot
        if logits.shape[0] != len(slots):
            raise RuntimeError(
                "hapo adaptive temperature: speculative decoding (several logits rows per "
                f"request) is not supported; got {logits.shape[0]} rows for {len(slots)} requests"
            )
        row_params = [self._slots[int(s)] for s in slots]
        if all(p is None for p in row_params):
            return logits
        scaled, _ = scale_rows(logits, row_params)
        return scaled


class HapoAdaptiveTemperatureV1(_V1Base):
    """V1-runner logits processor for component A (see the module docstring)."""

    def __init__(self, vllm_config: Any = None, device: Any = None, is_pin_memory: bool = False):
        self._rows: dict[int, HapoRequestParams] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        _validate(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # False on purpose: V1 runs argmax-invariant processors AFTER its temperature division,
        # and ours must see untempered logits (it computes the entropy of the raw distribution).
        return False

    def update_state(self, batch_update: Any) -> None:
        """Apply the batch changes in the documented order: removed, added, moved."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for added in batch_update.added:
            index, sampling_params = added[0], added[1]
            params = HapoRequestParams.from_sampling_params(sampling_params)
            if params is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = params
        for a, b, direction in batch_update.moved:
            a_entry = self._rows.pop(a, None)
            b_entry = self._rows.pop(b, None)
            if a_entry is not None:
                self._rows[b] = a_entry
            if b_entry is not None and getattr(direction, "name", str(direction)) == "SWAP":
                self._rows[a] = b_entry

    def apply(self, logits: Tensor) -> Tensor:
        if not self._rows:
            return logits
        row_params = [self._rows.get(i) for i in range(logits.shape[0])]
        scaled, _ = scale_rows(logits, row_params)
        return scaled


def plugin_class_for_runner(use_v2: bool) -> type:
    """The processor class for the model runner in use."""
    return HapoAdaptiveTemperature if use_v2 else HapoAdaptiveTemperatureV1
