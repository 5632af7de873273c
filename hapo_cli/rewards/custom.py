"""`data.rewards`: the score as a weighted sum of built-in graders and user functions.

    with RewardSet(data_cfg, incorrect_score) as rewards:
        rewards.probe(first_example)                   # at load: import, signature, shape
        out = rewards.score(examples_per_response, texts)
        out.total  # (B,) sum_i weight_i * reward_i      out.acc  # (B,) 0/1
        out.parts  # {metric key: (B,) float, NaN = no value}; out.errors {metric key: count}

Built-in graders run here (they bound their own time); Python functions run in a worker pool
(`pool.py`), one call per response (verl style) or per batch (trl style), each under
`data.reward_timeout`. A failed call (timed out, raised, wrong shape) scores
`data.reward_on_error` and is counted in `reward/<name>/errors`, or with
`data.reward_errors=raise` stops the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from analysis import schema

from ..errors import HapoError
from .plugins import VERL_ARGS
from .verify import Verifier, verify


class RewardError(HapoError):
    """A reward function that cannot be used (load-time probe) or failed under reward_errors=raise."""


def mean_key(name: str) -> str:
    return schema.reward_metric(name, schema.REWARD_PART_MEAN)


def errors_key(name: str) -> str:
    return schema.reward_metric(name, schema.REWARD_PART_ERRORS)


@dataclass
class RewardScores:
    total: Tensor  # (B,) float32 weighted sum
    acc: Tensor  # (B,) float32 0/1
    parts: dict[str, Tensor] = field(default_factory=dict)  # key -> (B,) float32, NaN = none
    errors: dict[str, int] = field(default_factory=dict)  # key -> failed calls


def _prompt_of(ex) -> Any:
    """The prompt as the dataset holds it (string or chat messages), for trl-style calls."""
    row = ex.row or {}
    return row.get("prompt", ex.prompt) if isinstance(row.get("prompt"), (str, list)) else ex.prompt


def verl_kwargs(ex, text: str) -> dict[str, Any]:
    row = ex.row or {}
    extra = row.get("extra_info")
    return dict(zip(VERL_ARGS, (str(row.get("data_source", ex.task)), text, ex.answer,
                                dict(extra) if isinstance(extra, dict) else {})))


def trl_kwargs(examples, texts: list[str]) -> dict[str, Any]:
    """prompts, completions (chat messages when the prompt is), and each dataset column."""
    prompts = [_prompt_of(ex) for ex in examples]
    completions: list[Any] = [
        [{"role": "assistant", "content": t}] if isinstance(p, list) else t
        for p, t in zip(prompts, texts)
    ]
    keys = dict.fromkeys(k for ex in examples for k in (ex.row or {}) if k != "prompt")
    columns = {k: [(ex.row or {}).get(k) for ex in examples] for k in keys}
    return {"prompts": prompts, "completions": completions, **columns}


class RewardSet:
    """The rewards of a `DataConfig` (non-empty `data.rewards`); a context manager owning the
    worker pool of its Python functions."""

    def __init__(self, data_cfg: Any, incorrect_score: float = 0.0) -> None:
        self.specs = list(data_cfg.rewards)
        if not self.specs:
            raise ValueError("RewardSet: data.rewards is empty")
        self.incorrect_score = float(incorrect_score)
        self.on_error, self.raise_errors = data_cfg.reward_on_error, data_cfg.reward_errors == "raise"
        self.timeout = data_cfg.reward_timeout
        self.user = [i for i, s in enumerate(self.specs) if s.builtin is None]
        self.pool = None
        if self.user:
            from .pool import RewardPool

            self.pool = RewardPool([(self.specs[i].function, self.specs[i].style)
                                    for i in self.user], data_cfg.reward_workers, self.timeout)
            for j, err in self.pool.load_errors.items():
                self.close()
                raise RewardError(f"{self._where(self.user[j])}: cannot be loaded ({err})")

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _where(self, i: int) -> str:
        return f"data.rewards[{i}].function={self.specs[i].function!r}"

    def probe(self, example: Any) -> None:
        """One call of every Python function on `example` (its ground truth as the response):
        RewardError naming the function if it has not the stated signature, fails, hangs or
        returns the wrong shape. Run at load, before any model is trained."""
        text = str(example.answer)
        for j, i in enumerate(self.user):
            kind, got = self._call(j, [example], [text])[0]
            if kind != "ok":
                raise RewardError(f"{self._where(i)} ({self.specs[i].style} style) on the first "
                                  f"row: {got}")

    def _call(self, j: int, examples, texts) -> list[tuple[str, Any]]:
        """Results of user function j: one per response (verl) or one for the batch (trl)."""
        assert self.pool is not None
        if self.specs[self.user[j]].style == "verl":
            calls = [(j, verl_kwargs(ex, t), 1) for ex, t in zip(examples, texts)]
        else:
            calls = [(j, trl_kwargs(examples, list(texts)), len(texts))]
        return self.pool.run(calls)

    def _builtin(self, name: str, examples, texts) -> list[float]:
        from ..data.files import row_verifier

        out = []
        for ex, t in zip(examples, texts):
            # `name` is one of plugins.BUILTIN: "source" or a verifier's name
            grader = (row_verifier("source", ex.row or {}) if name == "source"
                      else cast(Verifier, name))
            out.append(float(verify(grader, t, ex.answer)))
        return out

    def score(self, examples, texts) -> RewardScores:
        """Rewards of B responses; examples[i] is the `Example` response i answers."""
        n = len(texts)
        if len(examples) != n:
            raise ValueError(f"RewardSet.score: {len(examples)} examples for {n} responses")
        nan = float("nan")
        total = torch.zeros(n, dtype=torch.float64)
        parts: dict[str, Tensor] = {}
        errors: dict[str, int] = {}
        acc: Tensor | None = None
        verl_acc: Tensor | None = None
        first: Tensor | None = None  # the first entry's values
        user_index = {i: j for j, i in enumerate(self.user)}
        for i, spec in enumerate(self.specs):
            label = spec.label
            extras: dict[str, list[float]] = {}
            if spec.builtin is not None:
                correct = torch.tensor(self._builtin(spec.builtin, examples, texts),
                                       dtype=torch.float64)  # (B,)
                values = torch.where(correct > 0, 1.0, self.incorrect_score)
                acc = correct if acc is None else acc
            else:
                results = self._call(user_index[i], examples, texts)
                bad = [got for kind, got in results if kind != "ok"]
                if bad and self.raise_errors:
                    raise RewardError(f"{self._where(i)}: {bad[0]} (data.reward_errors=raise)")
                errors[errors_key(label)] = len(bad)
                values = torch.full((n,), nan, dtype=torch.float64)
                if spec.style == "trl":
                    kind, got = results[0]
                    row = got if kind == "ok" else [self.on_error] * n
                    values = torch.tensor([nan if v is None else v for v in row], dtype=torch.float64)
                else:
                    for r, (kind, got) in enumerate(results):
                        score, more = got if kind == "ok" else (self.on_error, {})
                        values[r] = score
                        for k, v in more.items():
                            extras.setdefault(k, [nan] * n)[r] = v
                    if "acc" in extras and verl_acc is None:
                        verl_acc = (torch.tensor(extras["acc"], dtype=torch.float64) > 0).double()
            first = values if first is None else first
            parts[mean_key(label)] = values.float()
            for k, v in extras.items():
                if not k:  # no key to log it under
                    continue
                # a returned "mean" or "errors" would overwrite the reward's own keys
                k = f"returned_{k}" if k in (schema.REWARD_PART_MEAN, schema.REWARD_PART_ERRORS) else k
                parts[schema.reward_metric(label, k)] = torch.tensor(v, dtype=torch.float32)
            total += spec.weight * torch.nan_to_num(values, nan=0.0)  # None counts 0 (TRL's nansum)
        if acc is None and verl_acc is not None:
            acc = verl_acc
        elif acc is None:
            assert first is not None  # a RewardSet has at least one reward
            acc = (torch.nan_to_num(first) > 0).double()
        return RewardScores(total.float(), acc.float(), parts, errors)


# One RewardSet per process and configuration: the learner scores every generation batch with it.
_SETS: dict[str, RewardSet] = {}


def reward_set(data_cfg: Any, incorrect_score: float = 0.0) -> RewardSet:
    """The process's RewardSet for these settings (created, with its workers, on first use)."""
    import atexit
    import json

    key = json.dumps([data_cfg.model_dump(mode="json", include={
        "rewards", "reward_timeout", "reward_workers", "reward_on_error", "reward_errors"}),
        incorrect_score], sort_keys=True)
    if key not in _SETS:
        if not _SETS:
            atexit.register(close_reward_sets)
        _SETS[key] = RewardSet(data_cfg, incorrect_score)
    return _SETS[key]


def close_reward_sets() -> None:
    """Stop every cached RewardSet's workers (end of a run; also at interpreter exit)."""
    while _SETS:
        _SETS.popitem()[1].close()


def mean_metrics(parts: list[dict[str, Tensor]], errors: list[dict[str, int]],
                 ranks: Any = None) -> dict[str, float]:
    """reward/<name>/... means over the responses that have a value (not NaN) and error counts,
    over several generation batches and, given `ranks` (a `Ranks`), over all ranks (a verl
    function's extra keys may differ between ranks: their union is taken first)."""
    sums: dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        v = torch.cat([p[key] for p in parts if key in p]).double()
        v = v[~torch.isnan(v)]
        sums[f"{key}\tsum"], sums[f"{key}\tcount"] = float(v.sum()), float(v.numel())
    for key in dict.fromkeys(k for e in errors for k in e):
        sums[f"{key}\terr"] = float(sum(e.get(key, 0) for e in errors))
    if ranks is not None and ranks.world > 1:
        import torch.distributed as dist

        every: list[Any] = [None] * ranks.world
        dist.all_gather_object(every, sorted(sums))
        sums = ranks.sum_dict({k: sums.get(k, 0.0) for ks in every for k in ks})
    out: dict[str, float] = {}
    for k, v in sums.items():
        key, kind = k.split("\t")
        if kind == "err":
            out[key] = v
        elif kind == "sum":
            c = sums[f"{key}\tcount"]
            out[key] = v / c if c else math.nan
    return out


def probe_rewards(data_cfg: Any, incorrect_score: float = 0.0, seed: int = 0) -> None:
    """The load-time check of `data.rewards`: every Python function imports, and one call on the
    first training row (or the first validation row) has the stated signature and returns the
    right shape; else one line naming the function (RewardError, exit 2). Nothing to do
    without data.rewards. The workers started here are the ones training then uses."""
    if not data_cfg.rewards or all(s.builtin is not None for s in data_cfg.rewards):
        return
    from ..data import first_example

    example = first_example(data_cfg, seed)
    try:
        reward_set(data_cfg, incorrect_score).probe(example)
    except BaseException:
        close_reward_sets()
        raise
