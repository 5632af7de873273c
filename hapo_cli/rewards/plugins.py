"""Reward functions from the user's Python: how they are named, loaded, called and checked.

Two calling conventions, so a peer's reward runs unchanged:

- `verl`: `compute_score(data_source, solution_str, ground_truth, extra_info)`, one response a
  call, keywords as verl's reward managers pass them; returns a number or a dict with a numeric
  "score" (its other numeric keys are logged, `reward/<name>/<key>`).
- `trl`: `fn(prompts, completions, **columns) -> list[float | None]`, one call for a batch of
  B responses, as TRL's `reward_funcs`; `columns` are the rows' dataset columns (one list of B
  values each); None = no reward for that response (counts 0 in the weighted sum, as TRL's
  nansum).

A function is named `path/to/file.py:name` or `package.module:name`. No torch here: the worker
processes (`pool.py`) import this module only.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# data.rewards entries that are hapo's own graders, not user code
BUILTIN = ("exact", "math", "dapo", "source")
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")


def split_ref(ref: str) -> tuple[str, str]:
    """("path/to/file.py" or "package.module", "name"); ValueError for anything else."""
    where, sep, name = ref.rpartition(":")
    if not sep or not where.strip() or not name.strip() or not name.isidentifier():
        raise ValueError(
            f"{ref!r} is not a reward function: expected a built-in grader "
            f"({', '.join(BUILTIN)}), 'path/to/file.py:name' or 'package.module:name'"
        )
    return where.strip(), name.strip()


def is_file_ref(where: str) -> bool:
    return where.endswith(".py") or "/" in where


def load_function(ref: str) -> Callable[..., Any]:
    """The callable `ref` names (imports the file or module). Raises ImportError / AttributeError
    / TypeError with a message that says which."""
    where, name = split_ref(ref)
    if is_file_ref(where):
        path = Path(where).resolve()
        if not path.is_file():
            raise ImportError(f"no such file: {where}")
        mod_name = f"hapo_reward_{abs(hash(str(path))):x}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{where} has no attribute {name!r}")
    if not callable(fn):
        raise TypeError(f"{where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) or type(value).__name__ in ("float32", "float64", "int64"):
        out = float(value)
        if math.isfinite(out):
            return out
        raise ValueError(f"{what} is {out}; expected a finite number")
    raise ValueError(f"{what} is a {type(value).__name__} ({value!r:.40}); expected a number")


def normalise(style: str, value: Any, n: int) -> Any:
    """The checked return value: verl -> (score, {key: float}); trl -> [float | None] * n.
    ValueError naming the expected shape otherwise."""
    if style == "verl":
        if isinstance(value, dict):
            if "score" not in value:
                raise ValueError(f"returned a dict without 'score' (keys: {', '.join(map(str, value))})")
            extras = {}
            for k, v in value.items():
                if k == "score":
                    continue
                try:
                    extras[str(k)] = _number(v, f"key {k!r}")
                except ValueError:
                    continue  # verl logs only numbers too; strings (e.g. "pred") are skipped
            return _number(value["score"], "'score'"), extras
        return _number(value, "the return value"), {}
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"returned a {type(value).__name__}; expected a list of {n} floats or None")
    if len(value) != n:
        raise ValueError(f"returned {len(value)} values for {n} completions")
    return [None if v is None else _number(v, f"value {i}") for i, v in enumerate(value)]


def run_call(fn: Callable[..., Any], style: str, kwargs: dict[str, Any], n: int) -> tuple[str, Any]:
    """("ok", normalised value) or (kind, one line) with kind one of signature, raised, shape."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        args = ", ".join(kwargs) if style == "verl" else "prompts, completions, **columns"
        return "signature", f"cannot be called as {style}-style ({args}): {err}"
    except ValueError:
        pass  # no signature to inspect (a C function): the call itself says
    try:
        value = fn(**kwargs)
    except Exception as err:
        text = str(err).strip().splitlines()
        return "raised", f"raised {type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
    try:
        return "ok", normalise(style, value, n)
    except ValueError as err:
        return "shape", str(err)
