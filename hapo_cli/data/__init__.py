"""Prompt sources: built-in synthetic tasks and local parquet/jsonl files.

    build_train_stream(data_cfg, tokenizer, seed) -> PromptStream   infinite, resumable
    build_val_sets(data_cfg, tokenizer) -> {name: [Example]}
    load_benchmark(name_or_path, data_cfg, tokenizer, limit) -> (name, [Example])

Seeds: a synthetic training stream is keyed by the RL seed under the split "train"; the
supervised warm-up uses the split "warmup" with `model.warmup.seed`; the held-out sets use the
split "heldout" with the reserved `HELDOUT_SEED`, and are drawn from a hash-partition of the
prompt space that training and warm-up streams never draw from (see `synthetic.py`). A file
stream shuffles its rows each epoch with `random.Random(seed * 1_000_003 + epoch)`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .files import (
    SUPPORTED_SUFFIXES,
    DataError,
    Example,
    encode_prompt,
    first_record_example,
    load_examples,
)
from .sources import is_dataset_source, source_name
from .synthetic import HELDOUT_SEED, HELDOUT_SPLIT, TASKS, check_task, synthetic_item

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "FileStream",
    "PromptStream",
    "SyntheticStream",
    "build_train_stream",
    "build_val_sets",
    "first_example",
    "heldout_examples",
    "load_benchmark",
    "load_examples",
    "synthetic_example",
]


def synthetic_example(
    task: str,
    difficulty: int,
    split: str,
    seed: int,
    index: int,
    tokenizer: Any,
    apply_chat_template: bool = True,
    direct_fraction: float = 0.0,
    shape: Any = None,
) -> Example:
    """Example `index` of a synthetic stream, tokenized (verifier "exact", target set; the
    direct answer with probability `direct_fraction`, see `synthetic_item`; prompt shaped by
    `shape`, a DataConfig, see `encode_prompt`)."""
    item = synthetic_item(task, difficulty, split, seed, index, direct_fraction)
    text, ids = encode_prompt(tokenizer, item.prompt, apply_chat_template, shape)
    uid = f"{task}:{difficulty}:{split}:{seed}:{index}"
    row = {"data_source": task, "prompt": item.prompt, "answer": item.answer}
    return Example(uid, text, ids, item.answer, "exact", item.target, task, row)


def heldout_examples(
    task: str,
    difficulty: int,
    n: int,
    tokenizer: Any,
    apply_chat_template: bool = True,
    seed: int = HELDOUT_SEED,
    shape: Any = None,
) -> list[Example]:
    """The first `n` held-out prompts of a task (reserved seed; never in a training stream)."""
    return [
        synthetic_example(task, difficulty, HELDOUT_SPLIT, seed, i, tokenizer, apply_chat_template,
                          shape=shape)
        for i in range(n)
    ]


class PromptStream:
    """An infinite, deterministic, resumable stream of prompts; its state is (index, epoch)."""

    def __init__(self) -> None:
        self.index = 0  # position within the current epoch
        self.epoch = 0

    def _take(self) -> Example:
        raise NotImplementedError

    def next_batch(self, n: int) -> list[Example]:
        if n <= 0:
            raise ValueError(f"next_batch: n={n} must be > 0")
        return [self._take() for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"index", "epoch"}:
            raise ValueError(f"PromptStream state needs keys index, epoch; got {sorted(state)}")
        index, epoch = int(state["index"]), int(state["epoch"])
        if index < 0 or epoch < 0:
            raise ValueError(f"PromptStream state must be non-negative, got {state}")
        self.index, self.epoch = index, epoch


class SyntheticStream(PromptStream):
    """Example i = synthetic_example(task, difficulty, split, seed, i, ...); epoch stays 0.
    `direct_fraction` (the warm-up's mixture of response styles) changes targets, not prompts."""

    def __init__(
        self,
        task: str,
        difficulty: int,
        seed: int,
        tokenizer: Any,
        split: str = "train",
        apply_chat_template: bool = True,
        direct_fraction: float = 0.0,
        shape: Any = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        check_task(task, difficulty)
        if split == HELDOUT_SPLIT:
            raise ValueError(f"SyntheticStream: split '{split}' is reserved for validation")
        self.task, self.difficulty, self.seed, self.split = task, difficulty, seed, split
        self.tokenizer, self.apply_chat_template = tokenizer, apply_chat_template
        self.direct_fraction = direct_fraction

    def _take(self) -> Example:
        ex = synthetic_example(
            self.task,
            self.difficulty,
            self.split,
            self.seed,
            self.index,
            self.tokenizer,
            self.apply_chat_template,
            self.direct_fraction,
            self.shape,
        )
        self.index += 1
        return ex


class FileStream(PromptStream):
    """Rows of a fixed list, reshuffled each epoch by (seed, epoch) when `shuffle`."""

    def __init__(self, examples: list[Example], seed: int, shuffle: bool = True) -> None:
        super().__init__()
        if not examples:
            raise ValueError("FileStream: no examples")
        self.examples, self.seed, self.shuffle = list(examples), seed, shuffle
        self._order_epoch, self._order = -1, list(range(len(self.examples)))

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _take(self) -> Example:
        if self.index >= len(self.examples):
            self.index, self.epoch = 0, self.epoch + 1
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        ex = self.examples[self._order[self.index]]
        self.index += 1
        return ex


def build_train_stream(data_cfg: Any, tokenizer: Any, seed: int) -> PromptStream:
    """The training prompt stream of a `DataConfig` for the RL seed `seed`."""
    if data_cfg.source == "synthetic":
        return SyntheticStream(
            data_cfg.task,
            data_cfg.difficulty,
            seed,
            tokenizer,
            "train",
            data_cfg.apply_chat_template,
            shape=data_cfg,
        )
    if not data_cfg.train_files:
        raise DataError("data.train_files is empty (data.source='files')")
    examples = [
        ex
        for f in data_cfg.train_files
        for ex in load_examples(f, data_cfg, tokenizer, data_cfg.train_verifier)
    ]
    return FileStream(examples, seed, data_cfg.shuffle)


def first_example(data_cfg: Any, seed: int = 0) -> Example:
    """The first row of the training data (else the first validation file), untokenized
    (`prompt_ids` empty): what `data.rewards`' load-time probe calls the functions on."""
    if data_cfg.source == "synthetic":
        item = synthetic_item(data_cfg.task, data_cfg.difficulty, "train", seed, 0)
        row = {"data_source": data_cfg.task, "prompt": item.prompt, "answer": item.answer}
        return Example(f"{data_cfg.task}:probe", item.prompt, (), item.answer, "exact",
                       item.target, data_cfg.task, row)
    source = (list(data_cfg.train_files) + list(data_cfg.val_files))[0]
    return first_record_example(source, data_cfg)


def build_val_sets(data_cfg: Any, tokenizer: Any) -> dict[str, list[Example]]:
    """Synthetic: {task: val_size held-out prompts}. Files: {name: rows of each val source}
    (a file's stem, a folder's name, an hf dataset's name; `sources.source_name`)."""
    if data_cfg.source == "synthetic":
        return {
            data_cfg.task: heldout_examples(
                data_cfg.task,
                data_cfg.difficulty,
                data_cfg.val_size,
                tokenizer,
                data_cfg.apply_chat_template,
                shape=data_cfg,
            )
        }
    out: dict[str, list[Example]] = {}
    for f in data_cfg.val_files:
        stem = source_name(f)
        if stem in out:
            raise DataError(f"data.val_files: two files are named '{stem}' (names must differ)")
        out[stem] = load_examples(f, data_cfg, tokenizer, data_cfg.val_verifier)
    return out


def load_benchmark(
    name_or_path: str, data_cfg: Any, tokenizer: Any, limit: int | None = None
) -> tuple[str, list[Example]]:
    """A benchmark for `hapo evaluate`: a data file (name = stem), a save_to_disk folder or
    hf:NAME[:CONFIG][@SPLIT] (`sources.py`), or a synthetic task, "arith"/"steps" (difficulty
    from data_cfg) or "arith:3"; synthetic sets hold `limit` (else data.val_size) held-out
    prompts, the others are truncated to `limit`."""
    if limit is not None and limit <= 0:
        raise ValueError(f"load_benchmark: limit={limit} must be > 0")
    path = Path(name_or_path)
    if is_dataset_source(name_or_path):
        examples = load_examples(name_or_path, data_cfg, tokenizer, data_cfg.val_verifier)
        return source_name(name_or_path), examples[:limit] if limit else examples
    if path.suffix in SUPPORTED_SUFFIXES or path.is_file():
        examples = load_examples(path, data_cfg, tokenizer, data_cfg.val_verifier)
        return path.stem, examples[:limit] if limit else examples
    task, _, level = name_or_path.partition(":")
    if task in TASKS:
        try:
            difficulty = int(level) if level else data_cfg.difficulty
            check_task(task, difficulty)
        except ValueError:
            raise DataError(
                f"benchmark '{name_or_path}': difficulty must be an integer in 1-5"
            ) from None
        n = limit or data_cfg.val_size
        examples = heldout_examples(task, difficulty, n, tokenizer, data_cfg.apply_chat_template,
                                    shape=data_cfg)
        return name_or_path, examples
    raise DataError(
        f"unknown benchmark '{name_or_path}': not a .parquet/.jsonl file, a save_to_disk "
        f"folder or hf:NAME[:CONFIG][@SPLIT], and not a synthetic task (known: {', '.join(sorted(TASKS))}, optionally with ':<difficulty>')"
    )
