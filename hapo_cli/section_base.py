"""The base of every recipe section: frozen, typed, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    # allow_inf_nan=False: `lr=.inf` or `eps_high=nan` is a load-time error, not a NaN run.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)
