"""The typed recipe: one frozen pydantic tree, validated once at the edge, passed down.

Every knob lives here exactly once, with its default and its description (the only documentation
of the field). `load_recipe(path, overrides)` reads YAML, applies `--set a.b=c` overrides, rejects
unknown keys, runs the cross-field checks and returns a frozen `Recipe`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .errors import RecipeError
from .sections import (  # noqa: F401 - the sections are part of the recipe's API
    MAX_SEED,
    AlgoConfig,
    DataConfig,
    DynamicSamplingConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    OverlongConfig,
    RolloutConfig,
    TinyModelConfig,
    TrainConfig,
    VllmConfig,
    WarmupConfig,
    _Section,
)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Recipe(_Section):
    name: str = Field(default="custom", description="Recipe name (default run directory name).")
    seed: int = Field(default=1, ge=0, le=MAX_SEED,
                      description="RL seed: data order, sampling, initialisation of RNGs.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="before")
    @classmethod
    def _vllm_tiny_heads(cls, data: Any) -> Any:
        """The tiny model's head count for vLLM when the recipe does not give one (see
        `model.tiny.num_heads`); written into the resolved recipe, so runs record it."""
        rollout, model = (data.get(k) if isinstance(data, dict) else None
                          for k in ("rollout", "model"))
        if not (isinstance(rollout, dict) and isinstance(model, dict)):
            return data
        tiny = model.get("tiny") or {}
        if (rollout.get("engine") not in ("vllm", "vllm-server") or model.get("init") != "warmup"
                or not isinstance(tiny, dict) or "num_heads" in tiny):
            return data
        hidden = tiny.get("hidden_size", TinyModelConfig.model_fields["hidden_size"].default)
        if not isinstance(hidden, int):
            return data  # the field's own validation reports it
        return {**data, "model": {**model, "tiny": {**tiny, "num_heads": max(hidden // 32, 1)}}}

    @model_validator(mode="before")
    @classmethod
    def _baseline_defaults(cls, data: Any) -> Any:
        """The named baseline's published settings (`Baseline.defaults`) where the recipe leaves
        them out; an explicit value contradicting one of its `fixed` settings is an error, so
        `--set algo.baseline=grpo` on a DAPO recipe does not train DAPO under GRPO's name."""
        if not isinstance(data, dict):
            return data
        algo = data.get("algo") or {}
        name = algo.get("baseline", "dapo") if isinstance(algo, dict) else None
        from .baselines import REGISTRY, baseline_names

        baseline_names()  # finds the registered baselines
        if name not in REGISTRY:
            return data  # the field's validator names the choices
        bl = REGISTRY[name]
        out = json.loads(json.dumps(data))
        for path, value in bl.defaults.items():
            *parents, leaf = path.split(".")
            node = out
            for p in parents:
                if not isinstance(node.get(p, {}), dict):
                    return data  # a section given as a value: its own validation reports it
                node = node.setdefault(p, {})
                if node is None:
                    return data
            if leaf not in node or node[leaf] is None and value is not None:
                node[leaf] = value
            elif path in bl.fixed and node[leaf] != value:
                raise ValueError(
                    f"algo.baseline={name}: {path}={node[leaf]!r} is not {name} ({bl.source} "
                    f"uses {value!r}); drop {path} (or set it to {value!r}), or choose "
                    "another baseline"
                )
        return out

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        t, r = self.train, self.rollout
        from .baselines import get_baseline

        refused = get_baseline(self.algo.baseline).check(self)
        if refused:
            raise ValueError(refused)
        ref = self.model.reference
        if self.algo.kl_coef > 0 and ref != "initial" and not Path(ref).is_dir():
            raise ValueError(f"model.reference={ref!r}: not a directory; expected 'initial' or a "
                             "local HF model directory")
        if t.prompts_per_step % t.mini_batch_prompts:
            raise ValueError(
                f"train.prompts_per_step={t.prompts_per_step} must be a multiple of "
                f"train.mini_batch_prompts={t.mini_batch_prompts}"
            )
        mini_responses = t.mini_batch_prompts * r.n
        if mini_responses % t.micro_batch_size and t.micro_batch_size < mini_responses:
            raise ValueError(
                f"train.micro_batch_size={t.micro_batch_size} must divide the mini-batch of "
                f"{mini_responses} responses (mini_batch_prompts x rollout.n)"
            )
        budget, longest = t.max_tokens_per_micro_batch, self.data.max_prompt_length + r.max_new_tokens
        if budget is not None and budget < longest:
            raise ValueError(
                f"train.max_tokens_per_micro_batch={budget} must be at least the longest "
                f"sequence, data.max_prompt_length + rollout.max_new_tokens = {longest}"
            )
        if self.model.init == "pretrained" and not self.model.path:
            raise ValueError("model.path is required when model.init='pretrained'")
        if self.data.source == "files" and not self.data.train_files:
            raise ValueError("data.train_files is required when data.source='files'")
        if self.train.overlong.enabled and self.train.overlong.buffer_len >= r.max_new_tokens:
            raise ValueError(
                f"train.overlong.buffer_len={self.train.overlong.buffer_len} must be smaller than "
                f"rollout.max_new_tokens={r.max_new_tokens}"
            )
        return self

    # ---- derived values (never stored) ----
    @property
    def components(self) -> str:
        from .components import letters_of

        return letters_of(self.algo)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def content_hash(self, *parts: str) -> str:
        """Stable hash of selected top-level sections (e.g. 'model', 'data')."""
        dump = self.model_dump(mode="json")
        return stable_hash({p: dump[p] for p in parts} if parts else dump)


def stable_hash(data: Any) -> str:
    """16 hex digits of sha256 over `data` as sorted-key JSON: the one way a recipe, or part
    of one, is hashed (warm-up cache keys, ablation plans, `Recipe.content_hash`)."""
    blob = json.dumps(data, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A file path, or a name under recipes/ (`tiny/hapo` -> recipes/tiny/hapo.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for cand in (RECIPES_DIR / f"{name_or_path}.yaml", RECIPES_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    if p.exists() and p.is_file():
        return p
    known = ", ".join(list_recipes()) or "none"
    raise RecipeError(f"recipe '{name_or_path}' not found: not a file and not one of: {known}")


def list_recipes() -> list[str]:
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(
        str(p.relative_to(RECIPES_DIR).with_suffix(""))
        for p in RECIPES_DIR.rglob("*.yaml")
        if "accelerate" not in p.parts and "ablations" not in p.parts
    )


def parse_value(raw: str) -> Any:
    """Typed parsing of an override value: YAML scalars/lists (`1e-4`, `true`, `[1, 2]`, `null`)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    except RecursionError:
        raise RecipeError(f"--set value {raw[:40]!r}...: nested too deeply") from None
    # YAML 1.1 reads '1e-4' as a string; accept plain float syntax.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


# A recipe is a few hundred values; YAML aliases can expand a tiny file into billions of
# nodes ("billion laughs") once copied. Count nodes as the copy would visit them, and stop early.
MAX_RECIPE_NODES = 100_000


def check_recipe_size(data: Any, source: str) -> None:
    """RecipeError if `data`, with aliases expanded, has more than MAX_RECIPE_NODES values."""
    seen, stack = 0, [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise RecipeError(
                f"recipe error ({source}): more than {MAX_RECIPE_NODES} values once YAML aliases "
                "are expanded; a recipe is a few hundred values (alias bomb?)"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a nested dict (copied); unknown paths fail later, in validation."""
    out = json.loads(json.dumps(data))  # YAML input was size-checked (check_recipe_size)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set '{item}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise RecipeError(f"--set '{item}': empty key")
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise RecipeError(
                f"--set '{item}': empty segment in key '{key.strip()}'; use e.g. train.lr=1e-3"
            )
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(
                    f"--set '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = parse_value(raw)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"recipe error ({source}): unknown key '{loc}'"
    if not loc:
        return f"recipe error ({source}): {msg}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f"={value!r}"
    return f"recipe error ({source}): {loc}{shown}: {msg}"


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    components: str | None = None,
    seed: int | None = None,
) -> Recipe:
    """YAML -> components -> `--set` overrides -> validation -> frozen Recipe."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = resolve_recipe_path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(
                f"recipe error ({p}): not UTF-8 text (byte {err.start}); expected a YAML file"
            ) from None
        except OSError as err:
            raise RecipeError(f"recipe error ({p}): cannot read: {err.strerror}") from None
        if "\x00" in text:
            raise RecipeError(f"recipe error ({p}): contains a NUL byte; expected a YAML text file")
        try:
            loaded = yaml.safe_load(text)
        except RecursionError:
            raise RecipeError(f"recipe error ({p}): nested too deeply") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"recipe error ({p}{where}): not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe error ({p}): expected a mapping at the top level")
        check_recipe_size(loaded, str(p))
        data = loaded
    if components is not None:
        from .components import apply_components

        data = apply_components(data, components)
    data = apply_overrides(data, list(overrides or []))
    if seed is not None:
        data["seed"] = seed
    return recipe_from_dict(data, source)
