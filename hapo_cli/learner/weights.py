"""Whether a rollout engine can sample from the learner's (possibly sharded) model; the full
parameters themselves come from `hapo_cli.sharded`."""

from __future__ import annotations

from ..errors import HapoError
from ..rollout.factory import samples_with_learner_module
from ..sharded import full_named_parameters, sharding_of

__all__ = ["check_engine_sharding", "full_named_parameters", "sharding_of"]


def check_engine_sharding(engine_name: str, accelerator, strategy=None) -> None:
    """The HF engine samples with the learner's own module: it needs full parameters. Under
    FSDP2 and ZeRO-3 the learner gives it an unsharded copy (`Strategy.engine_model`); without
    a strategy to make one, a sharded accelerator is refused."""
    sharding = sharding_of(accelerator)
    if strategy is not None:
        sharding = "none" if strategy.engine_copy or not strategy.sharded else sharding

    if samples_with_learner_module(engine_name) and sharding != "none":
        raise HapoError(
            f"rollout.engine={engine_name} cannot sample from a {sharding}-sharded model; "
            "use rollout.engine=vllm (or DDP / ZeRO-1/2)"
        )
