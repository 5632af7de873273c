"""The typed recipe: one frozen pydantic tree, validated once at the edge, passed down.

Every knob lives here exactly once, with its default and its description (the only documentation
of the field). `load_recipe(path, overrides)` reads YAML, applies `--set a.b=c` overrides, rejects
unknown keys, runs the cross-field checks and returns a frozen `Recipe`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A user error in a recipe, an override or a component string: one line, names the field."""


class _Section(BaseModel):
    # allow_inf_nan=False: `lr=.inf` or `eps_high=nan` is a load-time error, not a NaN run.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class TinyModelConfig(_Section):
    hidden_size: int = Field(64, gt=0, description="Hidden size of the embedded Qwen2 model.")
    num_layers: int = Field(2, gt=0, description="Transformer layers of the embedded model.")
    num_heads: int = Field(
        4, gt=0, description="Attention heads (key/value heads are equal). 4 with hidden 64 "
        "(head_dim 16): what the demo is calibrated on (2 heads reached 11 % held-out accuracy "
        "in 1500 warm-up steps where 4 reach 35 % in 310). Under rollout.engine=vllm, when not "
        "set, hidden_size/32 heads: vLLM's CPU attention rejects head_dim 16."
    )
    intermediate_size: int = Field(256, gt=0, description="MLP width of the embedded model.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        return self


class WarmupConfig(_Section):
    steps: int = Field(1500, ge=0, description="Supervised warm-up optimizer steps at most.")
    batch_size: int = Field(128, gt=0, description="Warm-up batch size (examples).")
    lr: float = Field(2e-3, gt=0, le=1, description="Warm-up AdamW learning rate.")
    seed: int = Field(0, description="Warm-up seed; part of the cache key, not the RL seed.")
    target_acc: float | None = Field(
        0.3, ge=0, le=1,
        description="Stop the warm-up once held-out greedy accuracy (a probe set) reaches this; "
        "None runs all steps. The tiny model learns abruptly, so a fixed step count lands "
        "anywhere from 3 % to 45 %; the target lands every warm-up seed near it.",
    )
    direct_fraction: float | None = Field(
        None, ge=0, le=1,
        description="Share of warm-up targets written as the direct answer ('#66') instead of "
        "the task's worked steps; part of the cache key. None: the task's default (data.task="
        "steps: 0.4, its two styles give the policy a length choice; arith, add, mul: 0).",
    )


class ModelConfig(_Section):
    init: Literal["pretrained", "warmup"] = Field(
        "pretrained",
        description="'pretrained': load `path` (any local HF causal LM). 'warmup': build the embedded "
        "tiny Qwen2 model and character tokenizer and train it supervised on the data task; the "
        "result is cached by content hash so every variant and seed starts from the same policy.",
    )
    path: str | None = Field(
        None, description="Local HF model directory (init=pretrained). Never fetched from a hub."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    cache_dir: str = Field(
        "results/.cache", description="Where warm-up models are cached (by content hash)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype of the learner's model."
    )
    gradient_checkpointing: bool = Field(False, description="Enable HF gradient checkpointing.")
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")

    @model_validator(mode="after")
    def _cache_dir_not_a_file(self) -> ModelConfig:
        if Path(self.cache_dir).is_file():
            raise ValueError(f"cache_dir={self.cache_dir!r} is a file; expected a directory")
        return self


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class DataConfig(_Section):
    source: Literal["synthetic", "files"] = Field(
        "synthetic", description="Built-in synthetic task or local parquet/jsonl files."
    )
    task: str = Field("arith", description="Synthetic task name (source=synthetic).")
    difficulty: int = Field(2, ge=1, le=5, description="Synthetic task difficulty knob (1-5).")
    train_files: list[str] = Field(
        default_factory=list, description="Training parquet/jsonl files (source=files)."
    )
    val_files: list[str] = Field(
        default_factory=list, description="Validation files; benchmark name = file stem."
    )
    prompt_key: str = Field("prompt", description="Column with the prompt (string or chat messages).")
    answer_key: str = Field(
        "reward_model.ground_truth", description="Dotted path to the ground-truth answer."
    )
    max_prompt_length: int = Field(
        512, gt=0,
        description="Longest prompt in tokens (after the chat template); longer ones are "
        "handled by data.truncation. The HAPO authors' scripts use 1024 (recipe/*.sh).",
    )
    truncation: Literal["drop", "left", "right", "error"] = Field(
        "drop",
        description="Prompts over data.max_prompt_length: 'drop' skips them (logged); 'left' keeps "
        "their last max_prompt_length tokens (verl's data.truncation='left', as the HAPO authors' "
        "scripts); 'right' keeps the first ones; 'error' stops with the file and row.",
    )
    train_verifier: Literal["math", "dapo", "source"] = Field(
        "math",
        description="Grader of training files. 'math': math-verify over the whole response "
        "(boxed answer first). 'dapo': the HAPO authors' math_dapo.compute_score grader (last "
        "'Answer:' line of the last 300 characters, normalised string equality, then a "
        "math-verify fallback; rewards/dapo.py), for DAPO-Math-17k. 'source': per row by its "
        "data_source, as verl's default_compute_score ('math_dapo' -> dapo, else math).",
    )
    val_verifier: Literal["math", "dapo", "source"] = Field(
        "math",
        description="Grader of validation/benchmark files (same choices as data.train_verifier); "
        "also used by `hapo evaluate` on files.",
    )
    apply_chat_template: bool = Field(
        True, description="Apply the tokenizer's chat template when it has one."
    )
    shuffle: bool = Field(True, description="Shuffle the training file order each epoch (by seed).")
    val_size: int = Field(
        200, gt=0, description="Held-out synthetic prompts per validation set (fixed seed)."
    )

    @model_validator(mode="after")
    def _known_task(self) -> DataConfig:
        if self.source == "synthetic":
            from .data.synthetic import check_task

            check_task(self.task, self.difficulty)  # ValueError names the known tasks
        return self


# ---------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------


class VllmConfig(_Section):
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="vLLM KV-cache share of GPU memory (CUDA; on CPU builds the "
        "KV cache is `cpu_kv_cache_gib` instead)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    enable_sleep_mode: bool | None = Field(
        None, description="Offload vLLM weights/KV during training. None: on with CUDA, off on "
        "vLLM's CPU build (which rejects sleep mode)."
    )
    max_model_len: int | None = Field(None, description="vLLM max_model_len (None: prompt+response).")
    enforce_eager: bool | None = Field(
        None, description="No CUDA graphs / torch.compile in vLLM. None: off with CUDA, on for the "
        "CPU build (compiling a small model costs more than it saves)."
    )
    cpu_kv_cache_gib: float = Field(
        0.5, gt=0, description="vLLM CPU build: KV cache size in GiB (vLLM's kv_cache_memory_bytes). "
        "Its gpu_memory_utilization would be a share of the NUMA node's RAM minus this whole "
        "process's use (learner included), which can reach zero."
    )
    weight_sync: Literal["auto", "load_weights", "reload_weights"] = Field(
        "auto", description="How learner weights reach vLLM. load_weights: the model's "
        "load_weights in place (unquantized CUDA). reload_weights: the worker's reload_weights "
        "(needed on CPU, where linear layers keep their weights in oneDNN handles). auto: "
        "reload_weights on CPU, load_weights elsewhere."
    )


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = Field("hf", description="Rollout engine.")
    n: int = Field(8, ge=1, description="Group size G: responses sampled per prompt.")
    temperature: float = Field(1.0, gt=0, description="Base sampling temperature T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length in tokens.")
    batch_size: int = Field(
        256, gt=0, description="HF engine: sequences generated per forward batch."
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig)


# ---------------------------------------------------------------------------------------------
# algo
# ---------------------------------------------------------------------------------------------


class AlgoConfig(_Section):
    baseline: Literal["dapo", "grpo", "forking"] = Field(
        "dapo",
        description="What the letters are added to. dapo: token-mean loss, dynamic sampling, overlong "
        "shaping. grpo: sequence-level advantages, seq-mean-token-mean. forking: DAPO with gradient "
        "only on the top-q entropy tokens of the batch.",
    )
    adaptive_temperature: bool = Field(False, description="A: per-token temperature from entropy.")
    token_level_advantage: bool = Field(False, description="B: token-level group average.")
    redistribute: bool = Field(False, description="C: differential advantage redistribution.")
    adaptive_clip: bool = Field(False, description="D: asymmetric adaptive clipping.")

    tau: float = Field(0.05, ge=0, description="A: temperature scale, T_t = T(1 + tau h).")
    beta: float = Field(1.0, ge=0, description="C: redistribution strength, A' = A(1 + beta h).")
    alpha: float = Field(1.0, ge=0, description="D: clip-bound adaptation strength.")
    eps_low: float = Field(0.2, gt=0, lt=1, description="PPO clip lower epsilon.")
    eps_high: float = Field(0.2, gt=0, le=1, description="PPO clip upper epsilon.")
    clip_c: float = Field(10.0, gt=1, description="Dual-clip constant c for negative advantages.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field(
        "token-mean", description="Loss aggregation; token-mean divides by the global token count."
    )
    entropy_pivot: float = Field(
        0.8, ge=0, le=1, description="Quantile q of log-entropy used as the pivot rho."
    )
    entropy_norm: Literal["paper", "released"] = Field(
        "paper",
        description="'paper': h keeps the sign of z (the paper's text). 'released': the authors' code "
        "(nearest-rank quantile, std, negative side scaled by min(z) so low entropy gets h > 0).",
    )
    entropy_stats_scope: Literal["batch", "microbatch"] = Field(
        "batch",
        description="'batch': stats once per training batch (micro-batch invariant). 'microbatch': "
        "per fixed-row micro-batch (train.micro_batch_size) of the old-policy entropies, for C and "
        "D (A always uses the batch stats). This approximates, not reproduces, the released code, "
        "which takes them per token-budget micro-batch (use_dynamic_bsz) from the current policy's "
        "entropies in each update forward (verl/workers/actor/dp_actor.py, update_policy).",
    )
    fallback_threshold: float = Field(
        5.0, gt=0, description="B: a group with any |A| >= this falls back to GRPO advantages."
    )
    adv_eps: float = Field(1e-6, gt=0, description="Epsilon added to group std.")
    forking_quantile: float = Field(
        0.2, gt=0, le=1,
        description="forking: fraction q of highest-entropy tokens trained; the threshold is the "
        "(1 - q) entropy quantile over the whole batch, all ranks together.",
    )
    forking_normalizer: Literal["all", "forking"] = Field(
        "all",
        description="forking: token-mean denominator. 'all': every valid token, as the objective "
        "of arXiv 2506.01939 (DAPO's 1/sum|o_i| times the indicator H_t >= tau), so gradients "
        "keep DAPO's scale. 'forking': only the forking tokens (about 1/q times larger).",
    )
    policy_temperature: Literal["base", "rollout"] = Field(
        "base",
        description="Temperature the learner scores tokens at: 'base' = T (paper), 'rollout' = the "
        "stored per-token T_t (exactly on-policy under A).",
    )
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling cap on pi_old/pi_behaviour (None: off)."
    )
    critical_quantile: float = Field(
        0.8, gt=0, lt=1, description="Tokens at or above this entropy quantile count as critical."
    )


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


class DynamicSamplingConfig(_Section):
    enabled: bool = Field(True, description="Drop groups whose metric is identical for all responses.")
    metric: Literal["acc", "score"] = Field("acc", description="Metric the filter looks at.")
    max_num_gen_batches: int = Field(
        4, ge=0, description="Generation batches per step at most (0 = unlimited)."
    )
    on_exhausted: Literal["partial", "raise"] = Field(
        "partial",
        description="When max_num_gen_batches run out before the batch is full: 'partial' trains "
        "on the groups kept (logged as rollout/fill_rate, rollout/partial_batch); 'raise' stops the "
        "run, as DAPO's trainer does (recipe/dapo/dapo_ray_trainer.py: 'Generated too many').",
    )
    refill: Literal["independent", "same"] = Field(
        "independent",
        description="Where extra generation batches come from: 'independent' is a second prompt "
        "stream (every variant of a seed sees the same primary prompts at the same step); 'same' "
        "takes the next prompts of the training stream, as DAPO's dataloader.",
    )


class OverlongConfig(_Section):
    enabled: bool = Field(True, description="DAPO overlong reward shaping.")
    buffer_len: int = Field(8, ge=0, description="Soft-penalty buffer before max_new_tokens.")
    penalty: float = Field(1.0, ge=0, description="Penalty at max length.")


class TrainConfig(_Section):
    prompts_per_step: int = Field(16, gt=0, description="Prompts per training step (x G responses).")
    mini_batch_prompts: int = Field(
        8, gt=0, description="PPO mini-batch in prompts; one optimizer step each."
    )
    micro_batch_size: int = Field(
        64, gt=0, description="Responses per forward/backward (gradient accumulation)."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each training batch.")
    max_steps: int = Field(100, ge=0, description="Training steps.")
    lr: float = Field(1e-6, gt=0, le=1, description="AdamW learning rate.")
    warmup_steps: int = Field(
        10, ge=0, description="Linear LR warm-up length, in train.warmup_unit steps."
    )
    warmup_unit: Literal["optimizer", "training"] = Field(
        "optimizer",
        description="What one warm-up step is. 'optimizer': one optimizer step (a PPO "
        "mini-batch). 'training': one training step (all its mini-batches share the lr), as verl "
        "steps the scheduler once per update_actor call (verl/workers/fsdp_workers.py), so the "
        "HAPO authors' 10 warm-up steps span 10 x 16 optimizer steps at 512 prompts / 32.",
    )
    warmup_start: Literal["one_over_n", "zero"] = Field(
        "one_over_n",
        description="Warm-up factor at warm-up step k (0-based) of n. 'one_over_n': (k+1)/n, so "
        "the first step trains at lr/n. 'zero': k/n, verl's get_constant_schedule_with_warmup "
        "(verl/utils/torch_functional.py): the first step trains at lr 0.",
    )
    incorrect_score: float = Field(
        0.0,
        description="Score of an incorrect response (a correct one scores 1); the overlong "
        "penalty is added to it. The HAPO authors' math_dapo.compute_score gives -1 "
        "(verl/utils/reward_score/math_dapo.py), so a full overlong penalty there is half the "
        "correct/incorrect gap; with 0 it is the whole gap.",
    )
    nonfinite_grad: Literal["abort", "skip"] = Field(
        "abort",
        description="A non-finite gradient norm: 'abort' stops the run (last good checkpoint "
        "kept); 'skip' drops that optimizer step, counts it in actor/skipped_steps and goes on, "
        "as verl's actor does (verl/workers/actor/dp_actor.py, _optimizer_step).",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must each be in [0, 1), e.g. [0.9, 0.999]")
        return self
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Accelerate mixed precision."
    )
    fused_logprobs: bool = Field(
        True, description="Chunked fused LM-head log-probs/entropy (never full fp32 logits)."
    )
    logprob_chunk_size: int = Field(1024, gt=0, description="Tokens per fused chunk.")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default).")


class EvalConfig(_Section):
    every: int = Field(10, ge=0, description="Validate every N steps (0 = only at start/end).")
    at_start: bool = Field(True, description="Validate before the first step.")
    n: int = Field(4, ge=1, description="Samples per prompt for avg@k.")
    temperature: float = Field(0.5, gt=0, description="Validation sampling temperature.")
    top_p: float = Field(0.7, gt=0, le=1, description="Validation top-p.")
    greedy: bool = Field(True, description="Also report greedy accuracy.")
    max_new_tokens: int | None = Field(None, description="None: rollout.max_new_tokens.")
    limit: int | None = Field(None, gt=0, description="Prompts per benchmark at most.")


class LogConfig(_Section):
    output_dir: str = Field("results", description="Root of run directories.")
    run_name: str | None = Field(None, description="Run directory name (None: from recipe name).")
    token_sample_every: int = Field(5, ge=0, description="Write token rows every N steps (0 = off).")
    token_sample_responses: int = Field(32, gt=0, description="Responses sampled into token rows.")
    checkpoint_every: int = Field(20, ge=0, description="Checkpoint every N steps (0 = end only).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Extra accelerate trackers besides metrics.jsonl."
    )


class Recipe(_Section):
    name: str = Field("custom", description="Recipe name (default run directory name).")
    seed: int = Field(1, description="RL seed: data order, sampling, initialisation of RNGs.")
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
        if rollout.get("engine") != "vllm" or not isinstance(tiny, dict) or "num_heads" in tiny:
            return data
        hidden = tiny.get("hidden_size", TinyModelConfig.model_fields["hidden_size"].default)
        if not isinstance(hidden, int):
            return data  # the field's own validation reports it
        return {**data, "model": {**model, "tiny": {**tiny, "num_heads": max(hidden // 32, 1)}}}

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        t, r = self.train, self.rollout
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
        if self.model.init == "pretrained" and not self.model.path:
            raise ValueError("model.path is required when model.init='pretrained'")
        if self.data.source == "files" and not self.data.train_files:
            raise ValueError("data.train_files is required when data.source='files'")
        if self.train.overlong.enabled and self.train.overlong.buffer_len >= r.max_new_tokens:
            raise ValueError(
                f"train.overlong.buffer_len={self.train.overlong.buffer_len} must be smaller than "
                f"rollout.max_new_tokens={r.max_new_tokens}"
            )
        if self.rollout.engine == "vllm" and self.model.init == "warmup":
            pass  # allowed: the warm-up model is saved to disk and vLLM loads it
        return self

    # ---- derived values (never stored) ----
    @property
    def components(self) -> str:
        from .components import letters_of

        return letters_of(self.algo)

    @property
    def responses_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.n

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def content_hash(self, *parts: str) -> str:
        """Stable hash of selected top-level sections (e.g. 'model', 'data')."""
        dump = self.model_dump(mode="json")
        blob = json.dumps({p: dump[p] for p in parts} if parts else dump, sort_keys=True)
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
