"""The recipe's sections: one frozen pydantic model per top-level key (model, data, rollout,
algo, train, eval, log). Every knob lives here exactly once, with its default and its
description (the only documentation of the field). `recipe.py` assembles them into `Recipe`
and loads recipes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from .baselines import baseline_names, baseline_sections, read_renamed
from .section_base import _Section
from .sections_data import DataConfig, RewardConfig  # noqa: F401 - part of the sections API

# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class TinyModelConfig(_Section):
    hidden_size: int = Field(default=64, gt=0, description="Hidden size of the embedded Qwen2 model.")
    num_layers: int = Field(default=2, gt=0, description="Transformer layers of the embedded model.")
    num_heads: int = Field(
        default=4, gt=0, description="Attention heads (key/value heads are equal). 4 with hidden 64 "
        "(head_dim 16): what the demo is calibrated on (2 heads reached 11 % held-out accuracy "
        "in 1500 warm-up steps where 4 reach 35 % in 310). Under rollout.engine=vllm, when not "
        "set, hidden_size/32 heads: vLLM's CPU attention rejects head_dim 16."
    )
    intermediate_size: int = Field(default=256, gt=0, description="MLP width of the embedded model.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        return self


# Seeds reach numpy's legacy seeding (through accelerate's set_seed), which takes 0..2**32-1.
MAX_SEED = 2**32 - 1


class WarmupConfig(_Section):
    steps: int = Field(default=1500, ge=0, description="Supervised warm-up optimizer steps at most.")
    batch_size: int = Field(default=128, gt=0, description="Warm-up batch size (examples).")
    lr: float = Field(default=2e-3, gt=0, le=1, description="Warm-up AdamW learning rate.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED,
                      description="Warm-up seed; part of the cache key, not the RL seed.")
    target_acc: float | None = Field(
        default=0.3, ge=0, le=1,
        description="Stop the warm-up once held-out greedy accuracy (a probe set) reaches this; "
        "None runs all steps. The tiny model learns abruptly, so a fixed step count lands "
        "anywhere from 3 % to 45 %; the target lands every warm-up seed near it.",
    )
    direct_fraction: float | None = Field(
        default=None, ge=0, le=1,
        description="Share of warm-up targets written as the direct answer ('#66') instead of "
        "the task's worked steps; part of the cache key. None: the task's default (data.task="
        "steps: 0.4, its two styles give the policy a length choice; arith, add, mul: 0).",
    )


class LoraConfig(_Section):
    rank: int = Field(default=8, gt=0, description="LoRA rank r of every adapter (B A is out x r x in).")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha: the adapters add (alpha / rank) B A.")
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Dropout on the adapters' input while training (0: the "
        "learner and the HF engine compute the same log-probs)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Last names of the linear layers that get adapters (e.g. "
        "[q_proj, v_proj]), or all-linear: every linear layer but the output embedding."
    )


class ModelConfig(_Section):
    init: Literal["pretrained", "warmup"] = Field(
        default="pretrained",
        description="'pretrained': load `path` (any local HF causal LM). 'warmup': build the embedded "
        "tiny Qwen2 model and character tokenizer and train it supervised on the data task; the "
        "result is cached by content hash so every variant and seed starts from the same policy.",
    )
    path: str | None = Field(
        default=None, description="Local HF model directory (init=pretrained). Never fetched from a hub."
    )
    tiny: TinyModelConfig | None = Field(
        default=None, description="init=warmup only: the embedded tiny model (its defaults when left "
        "out; an error for init=pretrained)."
    )
    warmup: WarmupConfig | None = Field(
        default=None, description="init=warmup only: the supervised warm-up (as `tiny`)."
    )
    cache_dir: str = Field(
        default="results/.cache", description="Where warm-up models are cached (by content hash)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Parameter dtype of the learner's model."
    )
    reference: str = Field(
        default="initial",
        description="The frozen reference policy of the KL penalty (used when algo.kl_coef > 0): "
        "'initial', the policy the run starts from (the warm-up policy or model.path, also on "
        "--resume), or a local HF model directory. Scored in the old-policy pass with the same "
        "micro-batches and packing, sharded like the policy under FSDP2.",
    )
    lora: LoraConfig | None = Field(
        default=None, description="Train LoRA adapters through PEFT (the lora extra) instead of every "
        "weight: the base is frozen, adapters fp32, the optimizer holds only them; checkpoints "
        "hold the merged model and the adapters (hapo_cli/lora.py). None: full training."
    )
    gradient_checkpointing: bool = Field(default=False, description="Enable HF gradient checkpointing.")
    trust_remote_code: bool = Field(default=False, description="Passed to from_pretrained.")

    @model_validator(mode="before")
    @classmethod
    def _says_what_it_is(cls, data: Any) -> Any:
        """The section holds what its `init` uses: tiny and warmup for the embedded model,
        neither for a pretrained one (a resolved paper recipe names no tiny model). Settings
        for the tiny model given to a pretrained one are an error, not silently dropped."""
        if not isinstance(data, dict):
            return data
        if data.get("init", "pretrained") == "warmup":
            return {"tiny": {}, "warmup": {}, **{k: v for k, v in data.items()
                                                  if v is not None or k not in ("tiny", "warmup")}}
        given = [k for k in ("tiny", "warmup") if data.get(k) is not None]
        if given:
            raise ValueError(f"model.{given[0]} applies only to model.init=warmup (this model is "
                             f"pretrained: model.path); --set model.{given[0]}=null drops it")
        return data

    @model_validator(mode="after")
    def _cache_dir_not_a_file(self) -> ModelConfig:
        if Path(self.cache_dir).is_file():
            raise ValueError(f"cache_dir={self.cache_dir!r} is a file; expected a directory")
        return self


# ---------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------


class VllmConfig(_Section):
    gpu_memory_utilization: float = Field(
        default=0.5, gt=0, le=1, description="vLLM KV-cache share of GPU memory (CUDA; on CPU builds the "
        "KV cache is `cpu_kv_cache_gib` instead)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor parallelism.")
    enable_sleep_mode: bool | None = Field(
        default=None, description="Offload vLLM weights/KV during training. None: on with CUDA, off on "
        "vLLM's CPU build (which rejects sleep mode)."
    )
    max_model_len: int | None = Field(default=None, description="vLLM max_model_len (None: prompt+response).")
    enforce_eager: bool | None = Field(
        default=None, description="No CUDA graphs / torch.compile in vLLM. None: off with CUDA, on for the "
        "CPU build (compiling a small model costs more than it saves)."
    )
    cpu_kv_cache_gib: float = Field(
        default=0.5, gt=0, description="vLLM CPU build: KV cache size in GiB (vLLM's kv_cache_memory_bytes). "
        "Its gpu_memory_utilization would be a share of the NUMA node's RAM minus this whole "
        "process's use (learner included), which can reach zero."
    )
    weight_sync: Literal["auto", "load_weights", "reload_weights"] = Field(
        default="auto", description="How learner weights reach vLLM. load_weights: the model's "
        "load_weights in place (unquantized CUDA). reload_weights: the worker's reload_weights "
        "(needed on CPU, where linear layers keep their weights in oneDNN handles). auto: "
        "reload_weights on CPU, load_weights elsewhere."
    )


class ServerConfig(_Section):
    urls: list[str] = Field(
        default_factory=list, description="rollout.engine=vllm-server: base URLs of `hapo serve` "
        "servers (http://host:port); each step's prompts are split across them. Empty: `hapo "
        "train` starts `count` local servers on 127.0.0.1 and stops them when it ends."
    )
    count: int = Field(default=1, ge=1, description="Local servers started when `urls` is empty.")
    weight_transfer: Literal["gloo", "nccl", "path"] = Field(
        default="gloo", description="How new weights reach the servers after every optimizer step. gloo: "
        "broadcast over CPU (hapo's backend, `hapo serve` on vLLM's CPU build); nccl: vLLM's "
        "backend (GPUs on both sides; untested in CI); path: a safetensors file under `path`, "
        "which the servers must see (a shared filesystem), reloaded by each server."
    )
    path: str | None = Field(default=None, description="weight_transfer=path: the shared folder "
                             "(None: <run>/weights-push).")
    master_address: str | None = Field(
        default=None, description="Address the servers reach the learner at for gloo/nccl (None: "
        "127.0.0.1 for local servers, else this host's address on the route to each server)."
    )
    chunk_mib: float = Field(default=512, gt=0, description="Weights pushed per /update_weights call.")
    max_inflight: int = Field(default=64, ge=1, description="Generate requests in flight per server.")
    connect_timeout_s: float = Field(
        default=60, gt=0, description="How long a server may take to answer /health before the run "
        "fails with one line naming its URL."
    )
    start_timeout_s: float = Field(default=600, gt=0, description="Local servers: start-up deadline.")
    request_timeout_s: float = Field(default=600, gt=0, description="Deadline of one HTTP request.")


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm", "vllm-server"] = Field(
        default="hf", description="Rollout engine: hf (the learner's module), vllm (a colocated "
        "vllm.LLM), vllm-server (vLLM servers, `rollout.server`)."
    )
    n: int = Field(default=8, ge=1, description="Group size G: responses sampled per prompt.")
    temperature: float = Field(default=1.0, gt=0, description="Base sampling temperature T.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling (1.0 = off).")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling (0 = off).")
    max_new_tokens: int = Field(default=32, gt=0, description="Maximum response length in tokens.")
    batch_size: int = Field(
        default=256, gt=0, description="HF engine: sequences generated per forward batch."
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)


# ---------------------------------------------------------------------------------------------
# algo
# ---------------------------------------------------------------------------------------------


class _AlgoShared(_Section):
    """The settings every baseline reads; a baseline's own are added as `algo.<name>`
    sections (`AlgoConfig`)."""

    baseline: str = Field(
        default="dapo",
        description="What the letters are added to: a baseline owns its advantages, token masks, "
        "loss and aggregation, and fills in its published settings where the recipe leaves them "
        "out (hapo_cli/baselines; docs/concepts.md, 'Baselines'). dapo: token-mean PPO, dynamic sampling, "
        "overlong shaping. grpo (DeepSeekMath): std-normalised sequence advantages, "
        "seq-mean-token-mean, k3 KL to the reference with kl_coef 0.04, no dynamic sampling. "
        "dr-grpo: no std, token sums over a constant. gspo: sequence-level ratio and clipping. "
        "cispo: clipped stop-gradient importance weight times log-prob. forking: DAPO with "
        "gradient only on the top-q entropy tokens of the batch.",
    )

    @field_validator("baseline")
    @classmethod
    def _known_baseline(cls, v: str) -> str:
        if v not in baseline_names():
            raise ValueError(f"{v!r} is not a baseline; expected one of: {', '.join(baseline_names())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """Old keys of a baseline's settings still load (`baselines.read_renamed`)."""
        return read_renamed(data)

    adaptive_temperature: bool = Field(default=False, description="A: per-token temperature from entropy.")
    token_level_advantage: bool = Field(default=False, description="B: token-level group average.")
    redistribute: bool = Field(default=False, description="C: differential advantage redistribution.")
    adaptive_clip: bool = Field(default=False, description="D: asymmetric adaptive clipping.")

    tau: float = Field(default=0.05, ge=0, description="A: temperature scale, T_t = T(1 + tau h).")
    beta: float = Field(default=1.0, ge=0, description="C: redistribution strength, A' = A(1 + beta h).")
    alpha: float = Field(default=1.0, ge=0, description="D: clip-bound adaptation strength.")
    eps_low: float = Field(
        default=0.2, gt=0, le=1, description="PPO clip lower epsilon (1: no lower bound, as CISPO)."
    )
    eps_high: float = Field(default=0.2, gt=0, le=1, description="PPO clip upper epsilon.")
    clip_c: float = Field(default=10.0, gt=1, description="Dual-clip constant c for negative advantages.")
    kl_coef: float = Field(
        default=0.0, ge=0,
        description="Weight of the KL penalty to the reference policy (model.reference) in the "
        "loss, aggregated like the policy loss (verl's use_kl_loss / kl_loss_coef, TRL's beta). "
        "0: no reference model is loaded. GRPO as published: 0.04.",
    )
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = Field(
        default="k3",
        description="Per-token KL estimator (algo.kl_penalty): k1 logp - ref; k2 (logp - ref)^2/2; "
        "k3 e^(ref - logp) - (ref - logp) - 1 (DeepSeekMath's, verl's low_var_kl); k3+ k3's "
        "value with k2's gradient (verl's 'k3+').",
    )
    entropy_coef: float = Field(
        default=0.0, ge=0,
        description="Entropy bonus: the loss minus this times the entropy of the current policy "
        "over the loss tokens (aggregated like the policy loss; verl's entropy_coeff), from the "
        "same fused log-prob pass. 0: off (the HAPO authors' recipes).",
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field(
        default="token-mean", description="Loss aggregation; token-mean divides by the global token count."
    )
    entropy_pivot: float = Field(
        default=0.8, ge=0, le=1, description="Quantile q of log-entropy used as the pivot rho."
    )
    entropy_norm: Literal["paper", "released"] = Field(
        default="paper",
        description="'paper': h keeps the sign of z (the paper's text). 'released': the authors' code "
        "(nearest-rank quantile, std, negative side scaled by min(z) so low entropy gets h > 0).",
    )
    entropy_stats_scope: Literal["batch", "microbatch"] = Field(
        default="batch",
        description="'batch': stats once per training batch (micro-batch invariant). 'microbatch': "
        "per fixed-row micro-batch (train.micro_batch_size) of the old-policy entropies, for C and "
        "D (A always uses the batch stats). This approximates, not reproduces, the released code, "
        "which takes them per token-budget micro-batch (use_dynamic_bsz) from the current policy's "
        "entropies in each update forward (verl/workers/actor/dp_actor.py, update_policy).",
    )
    fallback_threshold: float = Field(
        default=5.0, gt=0, description="B: a group with any |A| >= this falls back to GRPO advantages."
    )
    adv_eps: float = Field(default=1e-6, gt=0, description="Epsilon added to group std.")
    policy_temperature: Literal["base", "rollout"] = Field(
        default="base",
        description="Temperature the learner scores tokens at: 'base' = T (paper), 'rollout' = the "
        "stored per-token T_t (exactly on-policy under A).",
    )
    tis_cap: float | None = Field(
        default=None, gt=0, description="Truncated importance sampling cap on pi_old/pi_behaviour (None: off)."
    )
    critical_quantile: float = Field(
        default=0.8, gt=0, lt=1, description="Tokens at or above this entropy quantile count as critical."
    )


# `_AlgoShared` plus one `algo.<name>` section per baseline with settings of its own
if TYPE_CHECKING:  # a class the type checker can use in annotations (the sections are dynamic)
    AlgoConfig = _AlgoShared
else:
    AlgoConfig = create_model("AlgoConfig", __base__=_AlgoShared, __module__=__name__,
                              **baseline_sections())


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


class DynamicSamplingConfig(_Section):
    enabled: bool = Field(default=True, description="Drop groups whose metric is identical for all responses.")
    metric: Literal["acc", "score"] = Field(default="acc", description="Metric the filter looks at.")
    max_num_gen_batches: int = Field(
        default=4, ge=0, description="Generation batches per step at most (0 = unlimited)."
    )
    on_exhausted: Literal["partial", "raise"] = Field(
        default="partial",
        description="When max_num_gen_batches run out before the batch is full: 'partial' trains "
        "on the groups kept (logged as rollout/fill_rate, rollout/partial_batch); 'raise' stops the "
        "run, as DAPO's trainer does (recipe/dapo/dapo_ray_trainer.py: 'Generated too many').",
    )
    refill: Literal["independent", "same"] = Field(
        default="independent",
        description="Where extra generation batches come from: 'independent' is a second prompt "
        "stream (every variant of a seed sees the same primary prompts at the same step); 'same' "
        "takes the next prompts of the training stream, as DAPO's dataloader.",
    )


class OverlongConfig(_Section):
    enabled: bool = Field(default=True, description="DAPO overlong reward shaping.")
    buffer_len: int = Field(default=8, ge=0, description="Soft-penalty buffer before max_new_tokens.")
    penalty: float = Field(default=1.0, ge=0, description="Penalty at max length.")


class TrainConfig(_Section):
    prompts_per_step: int = Field(default=16, gt=0, description="Prompts per training step (x G responses).")
    mini_batch_prompts: int = Field(
        default=8, gt=0, description="PPO mini-batch in prompts; one optimizer step each."
    )
    micro_batch_size: int = Field(
        default=64, gt=0, description="Responses per forward/backward (gradient accumulation)."
    )
    ppo_epochs: int = Field(default=1, ge=1, description="Passes over each training batch.")
    max_steps: int = Field(default=100, ge=0, description="Training steps.")
    lr: float = Field(default=1e-6, gt=0, le=1, description="AdamW learning rate.")
    warmup_steps: int = Field(
        default=10, ge=0, description="Linear LR warm-up length, in train.warmup_unit steps."
    )
    warmup_unit: Literal["optimizer", "training"] = Field(
        default="optimizer",
        description="What one warm-up step is. 'optimizer': one optimizer step (a PPO "
        "mini-batch). 'training': one training step (all its mini-batches share the lr), as verl "
        "steps the scheduler once per update_actor call (verl/workers/fsdp_workers.py), so the "
        "HAPO authors' 10 warm-up steps span 10 x 16 optimizer steps at 512 prompts / 32.",
    )
    warmup_start: Literal["one_over_n", "zero"] = Field(
        default="one_over_n",
        description="Warm-up factor at warm-up step k (0-based) of n. 'one_over_n': (k+1)/n, so "
        "the first step trains at lr/n. 'zero': k/n, verl's get_constant_schedule_with_warmup "
        "(verl/utils/torch_functional.py): the first step trains at lr 0.",
    )
    incorrect_score: float = Field(
        default=0.0,
        description="Score of an incorrect response (a correct one scores 1); the overlong "
        "penalty is added to it. The HAPO authors' math_dapo.compute_score gives -1 "
        "(verl/utils/reward_score/math_dapo.py), so a full overlong penalty there is half the "
        "correct/incorrect gap; with 0 it is the whole gap.",
    )
    nonfinite_grad: Literal["abort", "skip"] = Field(
        default="abort",
        description="A non-finite gradient norm: 'abort' stops the run (last good checkpoint "
        "kept); 'skip' drops that optimizer step, counts it in actor/skipped_steps and goes on, "
        "as verl's actor does (verl/workers/actor/dp_actor.py, _optimizer_step).",
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clip.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas, each in [0, 1).")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must each be in [0, 1), e.g. [0.9, 0.999]")
        return self
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no", description="Accelerate mixed precision."
    )
    fused_logprobs: bool = Field(
        default=True, description="Chunked fused LM-head log-probs/entropy (never full fp32 logits)."
    )
    logprob_chunk_size: int = Field(default=1024, gt=0, description="Tokens per fused chunk.")
    packing: bool = Field(
        default=False,
        description="Padding-free learner forwards: each micro-batch's prompt+response rows are "
        "concatenated into one row of real tokens, position ids restarting at every sequence and "
        "attention kept inside each sequence (transformers detects packed rows from the position "
        "ids: block-diagonal masks for sdpa/eager, varlen kernels for flash-attention), as verl's "
        "use_remove_padding and OpenRLHF's packing_samples. Same loss and gradients as the padded "
        "path up to float rounding; the FLOPs and memory of padding are gone.",
    )
    max_tokens_per_micro_batch: int | None = Field(
        default=None, gt=0,
        description="Token budget (prompt + response tokens) of one forward/backward. Set: each "
        "mini-batch is split into the fewest micro-batches whose tokens fit the budget, balanced "
        "by Karmarkar-Karp (verl's use_dynamic_bsz / ppo_max_token_len_per_gpu, "
        "seqlen_balancing.py), ranks running the same number; the old-log-prob pass uses the "
        "same grouping and train.micro_batch_size is ignored for the update. The loss "
        "normaliser stays global over the mini-batch and ranks. Must be at least "
        "data.max_prompt_length + rollout.max_new_tokens. None: micro-batches of "
        "train.micro_batch_size responses.",
    )
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (None: torch default).")


class EvalConfig(_Section):
    every: int = Field(default=10, ge=0, description="Validate every N steps (0 = only at start/end).")
    at_start: bool = Field(default=True, description="Validate before the first step.")
    n: int = Field(default=4, ge=1, description="Samples per prompt for avg@k.")
    temperature: float = Field(default=0.5, gt=0, description="Validation sampling temperature.")
    top_p: float = Field(default=0.7, gt=0, le=1, description="Validation top-p.")
    greedy: bool = Field(default=True, description="Also report greedy accuracy.")
    max_new_tokens: int | None = Field(default=None, description="None: rollout.max_new_tokens.")
    limit: int | None = Field(default=None, gt=0, description="Prompts per benchmark at most.")


class LogConfig(_Section):
    output_dir: str = Field(default="results", description="Root of run directories.")
    run_name: str | None = Field(default=None, description="Run directory name (None: from recipe name).")
    token_sample_every: int = Field(default=5, ge=0, description="Write token rows every N steps (0 = off).")
    token_sample_responses: int = Field(default=32, gt=0, description="Responses sampled into token rows.")
    checkpoint_every: int = Field(default=20, ge=0, description="Checkpoint every N steps (0 = end only).")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept (oldest deleted).")
    checkpoint_format: Literal["dcp", "hf"] = Field(
        default="dcp", description="dcp: torch.distributed.checkpoint, every rank writes its own shards "
        "of model and optimizer, loadable on another world size or strategy (under DeepSpeed "
        "ZeRO: DeepSpeed's own per-rank files, resumed on the same number of ranks); hf: a "
        "save_pretrained folder + the whole optimizer in optimizer.pt, written by the main "
        "process (DeepSpeed ZeRO: + each rank's partition).")
    async_save: bool = Field(default=True, description="dcp: write checkpoints in a background thread "
                             "(the next step starts while the shards are written; DeepSpeed "
                             "ZeRO saves synchronously).")
    export_every: int = Field(default=0, ge=0, description="Write a Hugging Face save_pretrained folder "
                              "to <run>/exports/step-N every N steps (0 = only at the end of "
                              "the run, which always writes one).")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Extra accelerate trackers besides metrics.jsonl."
    )

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, v: list[str]) -> list[str]:
        twice = sorted({t for t in v if v.count(t) > 1})
        if twice:  # each would log every scalar twice
            raise ValueError(f"{', '.join(twice)} listed more than once; name each tracker once, "
                             f"e.g. [{', '.join(dict.fromkeys(v))}]")
        return v
