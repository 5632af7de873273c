"""The run-directory format: file names, metric names, column names.

The single place where these strings are spelled. The learner (``hapo_cli.runlog``) writes
with them and ``analysis`` reads with them, so renaming a metric here renames it on both
sides. This module imports nothing beyond the standard library: importing it must stay cheap
for the training process and must never pull in torch or pandas.

A run directory ``results/<run>/``::

    recipe.yaml                     fully resolved recipe (RECIPE)
    manifest.json                   status, seed, git revision, versions, times (MANIFEST)
    metrics.jsonl                   one JSON object per step, each with "step" (METRICS)
    tokens/step-000010.parquet      sampled token-level rows, TOKEN_COLUMNS (+ TOKEN_PROMPT)
    eval/<name>.jsonl               `hapo evaluate` rows, EVAL_* keys (EVAL_DIR)
    checkpoints/step-000010/        HF save_pretrained + trainer state (CHECKPOINTS_DIR)

An ablation directory holds ``ablation.json`` (ABLATION) and one run directory per
(variant, seed) as subfolders named in its plan.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- files and folders
RECIPE = "recipe.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
TOKENS_DIR = "tokens"
TOKENS_FILE = "step-{step:06d}.parquet"
TOKENS_GLOB = "step-*.parquet"
EVAL_DIR = "eval"
EVAL_GLOB = "*.jsonl"
EVAL_SAMPLES_SUFFIX = "-samples"  # eval/<name>-samples.jsonl: one row per prompt, not a result
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAME = "step-{step:06d}"
ABLATION = "ablation.json"


def tokens_file(step: int) -> str:
    """Relative path of the token sample of one step: ``tokens/step-000010.parquet``."""
    return f"{TOKENS_DIR}/{TOKENS_FILE.format(step=step)}"


def checkpoint_dir(step: int) -> str:
    """Relative path of one checkpoint: ``checkpoints/step-000010``."""
    return f"{CHECKPOINTS_DIR}/{CHECKPOINT_NAME.format(step=step)}"


_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    """``"step-000010"`` -> 10; ``None`` for any other folder name (temporaries included)."""
    m = _CHECKPOINT_RE.match(name)
    return int(m[1]) if m else None


def read_manifest(run_dir) -> dict:
    """``manifest.json`` of a run directory as a dict; ``{}`` when missing, unreadable or not
    an object (a run just starting). The one reader, for the learner, ablate and analysis."""
    import json
    from pathlib import Path

    try:
        obj = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------- metrics.jsonl
STEP = "step"  # int, present in every row

# actor: the PPO update (token-mean over the training batch)
ENTROPY_MEAN = "actor/entropy_mean"  # mean per-token entropy (nats) of the old policy
ENTROPY_P20 = "actor/entropy_p20"  # 20th percentile of per-token entropy
ENTROPY_P80 = "actor/entropy_p80"  # 80th percentile of per-token entropy
CLIP_FRAC_LOW = "actor/clip_frac_low"  # fraction of tokens clipped at 1 - eps_low (A < 0)
CLIP_FRAC_HIGH = "actor/clip_frac_high"  # fraction of tokens clipped at 1 + eps_high (A > 0)
CLIP_FRAC_LOW_HI_ENT = "actor/clip_frac_low_hi_ent"  # low-side, among tokens with h > 0
CLIP_FRAC_LOW_LO_ENT = "actor/clip_frac_low_lo_ent"  # low-side, among tokens with h <= 0
CLIP_FRAC_HIGH_HI_ENT = "actor/clip_frac_high_hi_ent"
CLIP_FRAC_HIGH_LO_ENT = "actor/clip_frac_high_lo_ent"
DUAL_CLIP_FRAC = "actor/dual_clip_frac"  # A < 0 and ratio > clip_c
RATIO_DEV_MEAN = "actor/ratio_dev_mean"  # mean |ratio - 1|
C_AMPLIFIED_FRAC = "actor/c_amplified_frac"  # component C: |A'| > |A|
C_DAMPED_FRAC = "actor/c_damped_frac"  # component C: |A'| < |A|
PG_LOSS = "actor/pg_loss"
GRAD_NORM = "actor/grad_norm"
LR = "actor/lr"
BEHAVIOUR_LOGP_GAP = "actor/behaviour_logp_gap"  # mean |rollout logp - learner old logp|
OPTIMIZER_STEPS = "actor/optimizer_steps"  # optimizer steps taken in this training step
SKIPPED_STEPS = "actor/skipped_steps"  # optimizer steps dropped for a non-finite gradient
RATIO_MEAN = "actor/ratio_mean"  # mean importance ratio pi_theta / pi_old
VALID_TOKENS = "actor/valid_tokens"  # loss tokens, summed over PPO epochs and micro-batches
KL = "actor/kl"  # mean per-token KL estimate (algo.kl_estimator) to the reference, in the update
KL_OLD = "actor/kl_old"  # the same, of the old policy (the scoring pass, before the update)
ENTROPY_BONUS = "actor/entropy_bonus"  # mean entropy the entropy_coef term rewarded
# the advantage mass the loss saw (after C and TIS), summed over PPO epochs and micro-batches;
# adv/* below is the mass of the batch before C, once
ADV_C_POS_TOKEN_SUM = "actor/adv_c_pos_token_sum"
ADV_C_NEG_TOKEN_SUM = "actor/adv_c_neg_token_sum"
ADV_C_POS_TOKEN_COUNT = "actor/adv_c_pos_token_count"
ADV_C_NEG_TOKEN_COUNT = "actor/adv_c_neg_token_count"

# adv: advantage mass of the batch. The token-level sums are those actually used; the seq_*
# sums are the same mass under sequence-level GRPO normalisation, computed every step for
# comparison. Negative sums are stored as negative numbers.
ADV_POS_TOKEN_SUM = "adv/pos_token_sum"
ADV_NEG_TOKEN_SUM = "adv/neg_token_sum"
ADV_POS_TOKEN_COUNT = "adv/pos_token_count"
ADV_NEG_TOKEN_COUNT = "adv/neg_token_count"
ADV_SEQ_POS_TOKEN_SUM = "adv/seq_pos_token_sum"
ADV_SEQ_NEG_TOKEN_SUM = "adv/seq_neg_token_sum"
ADV_FALLBACK_GROUPS = "adv/fallback_groups"  # groups that fell back to sequence-level GRPO

# rollout
RESPONSE_LEN_MEAN = "rollout/response_len_mean"
RESPONSE_LEN_CORRECT_MEAN = "rollout/response_len_correct_mean"
RESPONSE_LEN_INCORRECT_MEAN = "rollout/response_len_incorrect_mean"
CRITICAL_TOKENS = "rollout/critical_tokens"  # mean per response
TEMPERATURE_MEAN = "rollout/temperature_mean"
TEMPERATURE_STD = "rollout/temperature_std"
CRITICAL_THRESHOLD = "rollout/critical_threshold"  # entropy above which a token is critical
RESPONSES = "rollout/responses"  # responses kept for training this step
TRUNCATED_FRAC = "rollout/truncated_frac"
FILL_RATE = "rollout/fill_rate"  # dynamic sampling: kept groups / wanted groups
GEN_BATCHES = "rollout/gen_batches"
MIXED_GROUP_FRAC = "rollout/mixed_group_frac"  # groups whose rewards are not all equal
REFILL_BATCHES = "rollout/refill_batches"  # generation batches beyond the first
PARTIAL_BATCH = "rollout/partial_batch"  # 1 if dynamic sampling ran out before the batch filled
TRIMMED_GROUPS = "rollout/trimmed_groups"  # kept groups dropped so that all ranks train as many

# reward
REWARD_MEAN = "reward/mean"
REWARD_ACC = "reward/acc"
REWARD_ALL_MEAN = "reward/all_mean"  # before dynamic-sampling filtering
REWARD_ALL_ACC = "reward/all_acc"

# time (seconds)
TIME_GEN = "time/gen_s"
TIME_OLD_LOGP = "time/old_logp_s"
TIME_REF = "time/ref_logp_s"  # the reference policy's scoring pass (algo.kl_coef > 0)
TIME_TRAIN = "time/train_s"
TIME_STEP = "time/step_s"

# entropy stats of the batch (rho, sigma, scale+, scale-: hapo_cli/algo/entropy.py docstring)
ENTROPY_STATS_RHO = "entropy_stats/rho"
ENTROPY_STATS_STD = "entropy_stats/std"
ENTROPY_STATS_SCALE_POS = "entropy_stats/scale_pos"
ENTROPY_STATS_SCALE_NEG = "entropy_stats/scale_neg"
ENTROPY_STATS_EXACT = "entropy_stats/exact"  # 1 if the pivot quantile was exact
ENTROPY_STATS_BIN_ERROR = "entropy_stats/quantile_bin_error"  # histogram pivot error bound

# rows that are not a trained step
SKIPPED = "skipped"  # 1: no group was kept, nothing trained this step
ERROR = "error"  # the one-line reason the run stopped at this step

METRICS_NAMES: tuple[str, ...] = (
    ENTROPY_MEAN, ENTROPY_P20, ENTROPY_P80, CLIP_FRAC_LOW, CLIP_FRAC_HIGH,
    CLIP_FRAC_LOW_HI_ENT, CLIP_FRAC_LOW_LO_ENT, CLIP_FRAC_HIGH_HI_ENT, CLIP_FRAC_HIGH_LO_ENT,
    DUAL_CLIP_FRAC, RATIO_DEV_MEAN, C_AMPLIFIED_FRAC, C_DAMPED_FRAC, PG_LOSS, GRAD_NORM, LR,
    ADV_POS_TOKEN_SUM, ADV_NEG_TOKEN_SUM, ADV_POS_TOKEN_COUNT, ADV_NEG_TOKEN_COUNT,
    ADV_SEQ_POS_TOKEN_SUM, ADV_SEQ_NEG_TOKEN_SUM, ADV_FALLBACK_GROUPS,
    RESPONSE_LEN_MEAN, RESPONSE_LEN_CORRECT_MEAN, RESPONSE_LEN_INCORRECT_MEAN, CRITICAL_TOKENS,
    TEMPERATURE_MEAN, TRUNCATED_FRAC, FILL_RATE, GEN_BATCHES, MIXED_GROUP_FRAC,
    REWARD_MEAN, REWARD_ACC, TIME_GEN, TIME_OLD_LOGP, TIME_TRAIN, TIME_STEP,
    ENTROPY_STATS_RHO, ENTROPY_STATS_STD, ENTROPY_STATS_SCALE_POS, ENTROPY_STATS_SCALE_NEG,
    BEHAVIOUR_LOGP_GAP, OPTIMIZER_STEPS, TEMPERATURE_STD, CRITICAL_THRESHOLD, RESPONSES,
    REWARD_ALL_MEAN, REWARD_ALL_ACC, ENTROPY_STATS_EXACT, ENTROPY_STATS_BIN_ERROR,
    SKIPPED_STEPS, RATIO_MEAN, VALID_TOKENS, ADV_C_POS_TOKEN_SUM, ADV_C_NEG_TOKEN_SUM,
    ADV_C_POS_TOKEN_COUNT, ADV_C_NEG_TOKEN_COUNT, REFILL_BATCHES, PARTIAL_BATCH, TRIMMED_GROUPS,
    KL, KL_OLD, ENTROPY_BONUS, TIME_REF,
)  # fmt: skip
"""Every fixed metric name (the per-benchmark ``val/...`` names are built by the helpers)."""
ROW_KEYS: tuple[str, ...] = (STEP, SKIPPED, ERROR)
"""Keys of a metrics row that are not metrics."""

VAL_PREFIX = "val/"
_VAL_RE = re.compile(r"^val/(?P<bench>.+)/(?P<kind>avg@(?P<k>\d+)|greedy)$")


def val_metric(bench: str, k: int) -> str:
    """Validation accuracy averaged over k samples: ``val/<bench>/avg@<k>``."""
    if not bench:
        raise ValueError(f"benchmark name must be non-empty, got {bench!r}")
    if int(k) < 1:
        raise ValueError(f"avg@k needs k >= 1, got k={k!r}")
    return f"{VAL_PREFIX}{bench}/avg@{int(k)}"


def val_greedy_metric(bench: str) -> str:
    """Held-out greedy accuracy: ``val/<bench>/greedy``."""
    if not bench:
        raise ValueError(f"benchmark name must be non-empty, got {bench!r}")
    return f"{VAL_PREFIX}{bench}/greedy"


def parse_val_metric(name: str) -> tuple[str, str] | None:
    """``"val/aime24/avg@8"`` -> ``("aime24", "avg@8")``; ``None`` for any other name.

    A benchmark name may itself contain '/' (``val/math/500/avg@4`` -> ``("math/500", ...)``).
    """
    m = _VAL_RE.match(name)
    return (m["bench"], m["kind"]) if m else None


def is_val_metric(name: str) -> bool:
    """True for ``val/<bench>/avg@<k>`` and ``val/<bench>/greedy``."""
    return parse_val_metric(name) is not None


# Each reward of ``data.rewards`` on its own: ``reward/<name>/mean`` (mean over the responses
# that have a value), ``reward/<name>/errors`` (calls that timed out, raised or returned the
# wrong shape) and ``reward/<name>/<key>`` for each other numeric key a verl-style function
# returns. ``<name>`` is the reward's label (no '/'); the fixed ``reward/mean`` etc. above have
# one '/' only, so the two never meet.
REWARD_PREFIX = "reward/"
REWARD_PART_MEAN = "mean"
REWARD_PART_ERRORS = "errors"
_REWARD_RE = re.compile(r"^reward/(?P<name>[^/]+)/(?P<kind>.+)$")


def reward_metric(name: str, kind: str = REWARD_PART_MEAN) -> str:
    """One reward's metric: ``reward/<name>/mean``, ``reward/<name>/errors``, or a key its
    function returned, ``reward/<name>/<kind>``."""
    if not name or "/" in name:
        raise ValueError(f"reward name must be non-empty without '/', got {name!r}")
    if not kind:
        raise ValueError(f"reward metric kind must be non-empty, got {kind!r}")
    return f"{REWARD_PREFIX}{name}/{kind}"


def parse_reward_metric(key: str) -> tuple[str, str] | None:
    """``"reward/len_bonus/mean"`` -> ``("len_bonus", "mean")``; ``None`` for any other key
    (``reward/mean`` and the other fixed reward keys included)."""
    m = _REWARD_RE.match(key)
    return (m["name"], m["kind"]) if m else None


def is_reward_metric(key: str) -> bool:
    """True for a per-reward key ``reward/<name>/<kind>`` of ``data.rewards``."""
    return parse_reward_metric(key) is not None


def is_declared_metric(key: str) -> bool:
    """True for every key a metrics row may hold: the fixed names, the row keys, the
    validation and the per-reward families."""
    return (key in METRICS_NAMES or key in ROW_KEYS or is_val_metric(key)
            or is_reward_metric(key))


# ---------------------------------------------------------------- tokens/*.parquet
TOKEN_COLUMNS: tuple[str, ...] = (
    "step",  # int
    "sample",  # response index within the step
    "position",  # token index within the response
    "token_id",  # int
    "token_text",  # str, the decoded token
    "entropy",  # nats, untempered distribution
    "h",  # normalised entropy in [-1, 1]
    "temperature",  # sampling temperature T_t of this token
    "ratio",  # importance ratio pi_theta / pi_old
    "adv",  # advantage before component C
    "adv_c",  # advantage after component C
    "eps_low",  # clip bounds of this token (after D when on)
    "eps_high",
    "clip_side",  # one of CLIP_SIDES
    "reward",  # response score
    "acc",  # 0/1, response correct
)
# written on each sample's first row (null on its other rows): the prompt exactly as the model
# saw it, its token ids decoded with the special tokens kept (chat template, data.system_prompt,
# data.prompt_template, data.chat_template_kwargs applied). Optional: older runs lack it.
TOKEN_PROMPT = "prompt"
TOKEN_OPTIONAL_COLUMNS: tuple[str, ...] = (TOKEN_PROMPT,)
CLIP_SIDES: tuple[str, ...] = ("low", "high", "none")

# ---------------------------------------------------------------- manifest.json
MANIFEST_KEYS: tuple[str, ...] = (
    "status", "seed", "git_rev", "versions", "start_time", "end_time", "run_name",
    "components", "algo",
)  # fmt: skip
STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_FAILED = "failed"
RUN_STATUSES: tuple[str, ...] = (STATUS_RUNNING, STATUS_DONE, STATUS_FAILED)
NO_COMPONENTS = "none"  # "components" of the DAPO baseline; also the baseline variant name

# ---------------------------------------------------------------- eval/<name>.jsonl
EVAL_BENCHMARK = "benchmark"
EVAL_SETTING = "setting"  # "T=0.5" or "adaptive"
EVAL_TEMPERATURE = "temperature"  # float, or null
EVAL_ADAPTIVE = "adaptive"  # bool
EVAL_CHECKPOINT_STEP = "checkpoint_step"
EVAL_N = "n"
EVAL_PASS = "pass@k"  # dict {"1": .., "4": ..} or flattened "pass@1", "pass@4", ...
EVAL_RESPONSE_LEN = "response_len_mean"
EVAL_TRUNCATION = "truncation_rate"
EVAL_CRITICAL_TOKENS = "critical_tokens_mean"
EVAL_CRITICAL_THRESHOLD = "critical_entropy_threshold"
EVAL_AVG_RE = re.compile(r"^avg@(\d+|k)$")  # accuracy averaged over samples
EVAL_MAJ_RE = re.compile(r"^maj@(\d+|k)$")


def eval_setting(temperature: float | None, adaptive: bool) -> str:
    """The ``setting`` label of an eval row: ``"adaptive"`` or ``"T=0.5"``."""
    if adaptive:
        return "adaptive"
    if temperature is None:
        raise ValueError("a fixed-temperature eval setting needs a temperature, got None")
    return f"T={temperature:g}"


# ---------------------------------------------------------------- ablation.json
ABLATION_KEYS: tuple[str, ...] = ("name", "plan", "runs")
PLAN_KEYS: tuple[str, ...] = ("variant", "seed", "run_dir")
BASELINE_VARIANT = NO_COMPONENTS
# A variant '<letters>-released' is '<letters>' with the released code's entropy
# normalisation (algo.entropy_norm=released); '<letters>' is its paper-normalisation twin.
RELEASED_SUFFIX = "-released"


def paper_counterpart(variant: str) -> str | None:
    """``"ABCD-released"`` -> ``"ABCD"`` (the same letters, paper normalisation); None for a
    variant without the released suffix."""
    if variant.endswith(RELEASED_SUFFIX) and len(variant) > len(RELEASED_SUFFIX):
        return variant[: -len(RELEASED_SUFFIX)]
    return None


def ablation_run_dir(variant: str, seed: int) -> str:
    """Default subfolder name of one ablation run: ``AB-s1``."""
    return f"{variant}-s{int(seed)}"
