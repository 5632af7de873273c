"""The recipe's data section (prompt sources, prompt shaping, rewards), apart from the other
sections in `sections.py` to keep each module readable; `sections` re-exports them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .section_base import _Section

# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class RewardConfig(_Section):
    function: str = Field(
        description="A built-in grader (exact: the synthetic tasks' own, also spelt by a task's "
        "name; math; dapo; source: per row by data_source, as data.train_verifier), or a Python "
        "function 'path/to/file.py:name' / 'package.module:name' (rewards/plugins.py)."
    )
    weight: float = Field(default=1.0,
                          description="Its weight in the total: score = sum weight x reward.")
    style: Literal["verl", "trl"] = Field(
        default="verl",
        description="Calling convention of a Python function. verl: compute_score(data_source, "
        "solution_str, ground_truth, extra_info) -> float | {'score': float, ...} per response "
        "(other numeric keys are logged). trl: (prompts, completions, **columns) -> "
        "list[float | None] per batch (None counts 0). Ignored for built-in graders.",
    )
    name: str | None = Field(
        default=None, description="Name in the logs (reward/<name>/mean); None: the grader's or the "
        "function's name."
    )

    @field_validator("function")
    @classmethod
    def _known_function(cls, v: str) -> str:
        from .data.synthetic import TASKS
        from .rewards.plugins import BUILTIN, is_file_ref, split_ref

        if v in BUILTIN or v in TASKS:
            return v
        where, _ = split_ref(v)  # ValueError: not name-shaped
        if is_file_ref(where) and not Path(where).is_file():
            raise ValueError(f"no such file: {where} (give a path relative to where hapo runs)")
        return v

    @field_validator("name")
    @classmethod
    def _name_is_one_segment(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v):
            raise ValueError(f"{v!r} must be a non-empty name without '/' (it is the middle of "
                             "reward/<name>/mean)")
        return v

    @property
    def builtin(self) -> str | None:
        """The built-in grader this names ("exact" for a task's name), or None for user code."""
        from .rewards.plugins import BUILTIN

        return self.function if self.function in BUILTIN else (
            None if ":" in self.function else "exact")

    @property
    def label(self) -> str:
        return self.name or (self.function if ":" not in self.function
                             else self.function.rpartition(":")[2])


class DataConfig(_Section):
    source: Literal["synthetic", "files"] = Field(
        default="synthetic", description="Built-in synthetic task or local parquet/jsonl files."
    )
    task: str = Field(default="arith", description="Synthetic task name (source=synthetic).")
    difficulty: int = Field(default=2, ge=1, le=5,
                            description="Synthetic task difficulty knob (1-5).")
    train_files: list[str] = Field(
        default_factory=list, description="Training data (source=files): parquet/jsonl files, "
        "folders written by datasets' save_to_disk (folder@split for a DatasetDict), or "
        "hf:NAME[:CONFIG][@SPLIT] through datasets.load_dataset (split default train; offline "
        "from the local cache with HF_DATASETS_OFFLINE=1). Needs the datasets extra for the last two."
    )
    val_files: list[str] = Field(
        default_factory=list, description="Validation data, as data.train_files; benchmark name = "
        "file stem, folder name or dataset name."
    )
    prompt_key: str = Field(default="prompt", description="Column with the prompt (string or chat messages).")
    answer_key: str = Field(
        default="reward_model.ground_truth", description="Dotted path to the ground-truth answer."
    )
    max_prompt_length: int = Field(
        default=512, gt=0,
        description="Longest prompt in tokens (after the chat template); longer ones are "
        "handled by data.truncation. The HAPO authors' scripts use 1024 (recipe/*.sh).",
    )
    truncation: Literal["drop", "left", "right", "error"] = Field(
        default="drop",
        description="Prompts over data.max_prompt_length: 'drop' skips them (logged); 'left' keeps "
        "their last max_prompt_length tokens (verl's data.truncation='left', as the HAPO authors' "
        "scripts); 'right' keeps the first ones; 'error' stops with the file and row.",
    )
    train_verifier: Literal["math", "dapo", "source"] = Field(
        default="math",
        description="Grader of training files. 'math': math-verify over the whole response "
        "(boxed answer first). 'dapo': the HAPO authors' math_dapo.compute_score grader (last "
        "'Answer:' line of the last 300 characters, normalised string equality, then a "
        "math-verify fallback; rewards/dapo.py), for DAPO-Math-17k. 'source': per row by its "
        "data_source, as verl's default_compute_score ('math_dapo' -> dapo, else math).",
    )
    val_verifier: Literal["math", "dapo", "source"] = Field(
        default="math",
        description="Grader of validation/benchmark files (same choices as data.train_verifier); "
        "also used by `hapo evaluate` on files.",
    )
    apply_chat_template: bool = Field(
        default=True, description="Apply the tokenizer's chat template when it has one."
    )
    system_prompt: str | None = Field(
        default=None, description="A system message put first in every prompt (replacing a row's own). "
        "Without a chat template, its text and the prompt joined by a newline."
    )
    prompt_template: str | None = Field(
        default=None, description="The user message as a template: every '{prompt}' is replaced by the "
        "row's prompt (its last user message); other braces stay as written, e.g. "
        "'{prompt}\\nPlease reason step by step, and put your final answer within \\boxed{}.'."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments of the tokenizer's "
        "apply_chat_template, e.g. {enable_thinking: false} for Qwen3. See the rendered first "
        "prompt with `hapo recipes show NAME --prompt`."
    )
    rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="The reward as a weighted sum of graders and Python functions, each logged "
        "as reward/<name>/mean (and /errors). Empty: each row's grader (data.train_verifier, "
        "data.val_verifier, the task's own), 1 if correct else train.incorrect_score. A "
        "built-in entry scores the same 1/incorrect_score. Accuracy (reward/acc, dynamic "
        "sampling on acc, evaluate's avg@k) is the first built-in entry's, else a verl "
        "function's 'acc' key, else whether the first entry's reward is > 0.",
    )
    reward_timeout: float = Field(
        default=10.0, gt=0, description="Seconds one call of a Python reward function may take (a batch "
        "for trl-style); past it the call scores data.reward_on_error and its worker restarts."
    )
    reward_workers: int = Field(
        default=1, ge=1, description="Worker processes running Python reward functions (per rank)."
    )
    reward_on_error: float = Field(
        default=0.0, description="Reward of a call that timed out, raised or returned the wrong shape "
        "(counted in reward/<name>/errors)."
    )
    reward_errors: Literal["score", "raise"] = Field(
        default="score", description="score: a failed call scores data.reward_on_error. raise: it stops "
        "the run with the function's error."
    )
    shuffle: bool = Field(default=True,
                          description="Shuffle the training file order each epoch (by seed).")
    val_size: int = Field(
        default=200, gt=0, description="Held-out synthetic prompts per validation set (fixed seed)."
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, v: str | None) -> str | None:
        if v is not None and "{prompt}" not in v:
            raise ValueError("must contain '{prompt}' where the row's prompt goes, e.g. "
                             "'{prompt} Answer with a number.'")
        return v

    @field_validator("rewards")
    @classmethod
    def _names_once(cls, v: list[RewardConfig]) -> list[RewardConfig]:
        labels = [r.label for r in v]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"two rewards are named {twice[0]!r}; give one a 'name'")
        return v

    @model_validator(mode="after")
    def _known_task(self) -> DataConfig:
        if self.source == "synthetic":
            from .data.synthetic import check_task

            check_task(self.task, self.difficulty)  # ValueError names the known tasks
        return self
