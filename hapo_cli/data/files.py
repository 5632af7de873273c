"""The prompt record, and local parquet/jsonl files in the DAPO-Math-17k / verl layout.

A verl row looks like

    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "..."}],
     "reward_model": {"style": "rule-lean", "ground_truth": "34"}, ...}

`prompt` may also be a plain string; the answer is found by a dotted path
(`DataConfig.answer_key`, default `reward_model.ground_truth`) or a flat column of that name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import HapoError
from .sources import SUPPORTED_SUFFIXES, is_dataset_source, read_dataset_rows, source_name

logger = logging.getLogger("hapo.data")


class DataError(HapoError):
    """A malformed data file or record: one line naming the file and row."""


@dataclass(frozen=True)
class Example:
    uid: str  # stable id of the prompt (groups of responses share it)
    prompt: str  # text fed to the model, after any chat template
    prompt_ids: tuple[int, ...]  # tokenized `prompt` (no special tokens added)
    answer: str  # ground truth given to the verifier
    verifier: Literal["exact", "math", "dapo"]
    target: str | None  # reference response for the supervised warm-up (synthetic only)
    task: str  # synthetic task name or file stem
    # the dataset row (columns for data.rewards functions: data_source, extra_info, ...)
    row: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def shape_messages(prompt: str | list[dict[str, str]], shape: Any = None) -> list[dict[str, str]]:
    """The chat messages of a prompt after `data.prompt_template` (every "{prompt}" in it
    replaced by the last user message; other braces, e.g. \\boxed{}, stay as written) and
    `data.system_prompt` (a system message first, replacing the row's own). `shape` is a
    `DataConfig` or None (no shaping)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    template = getattr(shape, "prompt_template", None)
    if template:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is not None:
            content = template.replace("{prompt}", messages[last]["content"])
            messages[last] = {**messages[last], "content": content}
    system = getattr(shape, "system_prompt", None)
    if system:
        messages = [{"role": "system", "content": system},
                    *(m for m in messages if m["role"] != "system")]
    return messages


def encode_prompt(
    tokenizer: Any, prompt: str | list[dict[str, str]], apply_chat_template: bool,
    shape: Any = None,
) -> tuple[str, tuple[int, ...]]:
    """(text, ids) of a prompt shaped by `shape` (see `shape_messages`): the chat template
    with a generation prompt (and `data.chat_template_kwargs`) when asked for and the tokenizer
    has one; otherwise the string itself, or the messages' contents joined by newlines."""
    messages = shape_messages(prompt, shape)
    if apply_chat_template and has_chat_template(tokenizer):
        kwargs = dict(getattr(shape, "chat_template_kwargs", None) or {})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **kwargs)
    elif isinstance(prompt, str) and len(messages) == 1:
        text = messages[0]["content"]
    else:
        text = "\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, tuple(int(i) for i in ids)


def _lookup(record: dict, key: str) -> Any:
    """record[key] if present, else the dotted path a.b.c; KeyError when missing."""
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _read_records(path: Path | str) -> list[tuple[str, dict]]:
    """[(where, record)] with `where` like "line 3" (jsonl) or "row 3" (parquet, datasets),
    1-based."""
    if is_dataset_source(path):
        return read_dataset_rows(path)
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path} line {line}: not UTF-8 text; expected JSON lines") from None
        for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: \u2028 is valid JSON
            if not line.strip():
                continue
            if "\x00" in line:
                raise DataError(f"{path} line {lineno}: contains a NUL byte; expected JSON")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            out.append((f"line {lineno}", record))
        return out
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__})") from None
    return [(f"row {i}", r) for i, r in enumerate(rows, start=1)]


def _parse_prompt(value: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m):
                raise DataError(f"{where}: prompt messages need 'role' and string 'content'")
            messages.append({"role": str(m["role"]), "content": m["content"]})
        return messages
    raise DataError(
        f"{where}: prompt must be a string or a non-empty list of chat messages, "
        f"got {type(value).__name__}"
    )


def _parse_answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        raise DataError(f"{where}: '{key}' must be a string or number, got {value!r:.60}")
    return str(value).strip()


def check_prompt_content(prompt: str | list[dict[str, str]], text: str, ids: tuple[int, ...],
                         tokenizer: Any, where: str, key: str) -> None:
    """DataError unless the prompt asks something: not empty or whitespace only, and at least
    one of its tokens known to the tokenizer (not all `<unk>`). Checked at load, so such a row
    is one line naming the file and row, not a `generate` error steps into training."""
    content = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    if not content.strip():
        shown = "empty" if not content else f"whitespace only ({content!r:.40})"
        raise DataError(f"{where}: '{key}' is {shown}; expected a question")
    if text != content:  # a chat template (or message joining) added tokens: judge the content
        ids = tuple(tokenizer(content, add_special_tokens=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and all(i == unk for i in ids)):
        got = "encodes to 0 tokens" if not ids else f"is {len(ids)} unknown tokens"
        raise DataError(
            f"{where}: '{key}' ({content!r:.40}) {got}: none is in the tokenizer's "
            "vocabulary; expected text the model can read"
        )


def row_verifier(choice: str, record: dict) -> Literal["math", "dapo"]:
    """The verifier of one row: `choice` itself, or for "source" verl's dispatch on the row's
    `data_source` (`verl/utils/reward_score/__init__.py`, `default_compute_score`): a source
    containing "math_dapo" is graded by `math_dapo.compute_score` ("dapo"), any other math
    source by math-verify over the whole response ("math")."""
    if choice != "source":
        return choice  # type: ignore[return-value]
    return "dapo" if "math_dapo" in str(record.get("data_source", "")) else "math"


def truncate_prompt(ids: tuple[int, ...], max_len: int, side: str) -> tuple[int, ...] | None:
    """Prompt token ids cut to `max_len`: "left" keeps the last max_len tokens (verl's
    `data.truncation='left'`, the end of the prompt and the generation prompt survive),
    "right" the first max_len; "drop" returns None for a long prompt; "error" raises."""
    if len(ids) <= max_len:
        return ids
    if side == "left":
        return ids[-max_len:]
    if side == "right":
        return ids[:max_len]
    if side == "drop":
        return None
    raise DataError(
        f"prompt of {len(ids)} tokens is longer than data.max_prompt_length={max_len} "
        "(data.truncation='error'; use left, right or drop)"
    )


def first_record_example(path: str | Path, data_cfg: Any) -> Example:
    """The first row of a data file as an untokenized Example (`prompt_ids` empty)."""
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    where, record = records[0]
    try:
        raw_prompt, raw_answer = (_lookup(record, data_cfg.prompt_key),
                                  _lookup(record, data_cfg.answer_key))
    except KeyError as err:
        raise DataError(f"{path} {where}: missing key '{err.args[0]}'") from None
    prompt = _parse_prompt(raw_prompt, f"{path} {where}")
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    answer = _parse_answer(raw_answer, f"{path} {where}", data_cfg.answer_key)
    stem = source_name(path)
    return Example(f"{stem}:probe", text, (), answer,
                   row_verifier(data_cfg.train_verifier, record), None, stem, record)


def load_examples(
    path: str | Path, data_cfg: Any, tokenizer: Any, verifier: str = "math"
) -> list[Example]:
    """Read a .parquet or .jsonl file, a save_to_disk folder or an hf: dataset (`sources.py`)
    into Examples graded by `verifier` ("math", "dapo", or "source": per row, see
    `row_verifier`).

    `data_cfg` is a `DataConfig`: prompt_key, answer_key, apply_chat_template, the prompt
    shaping (system_prompt, prompt_template, chat_template_kwargs), max_prompt_length and
    truncation are read. Prompts longer than max_prompt_length tokens are
    truncated or dropped (data.truncation) and the count logged on the "hapo.data" logger.
    Errors name the file and the 1-based row.
    """
    stem = source_name(path)
    if is_dataset_source(path):
        records = _read_records(path)
    else:
        records = _read_file_records(Path(path))
    if not records:
        raise DataError(f"{path}: no records")
    side = data_cfg.truncation
    examples, too_long = [], 0
    for where, record in records:
        where = f"{path} {where}"
        try:
            raw_prompt, raw_answer = (
                _lookup(record, data_cfg.prompt_key),
                _lookup(record, data_cfg.answer_key),
            )
        except KeyError as err:
            raise DataError(
                f"{where}: missing key '{err.args[0]}' (has: {', '.join(map(str, record))})"
            ) from None
        prompt = _parse_prompt(raw_prompt, where)
        answer = _parse_answer(raw_answer, where, data_cfg.answer_key)
        text, ids = encode_prompt(tokenizer, prompt, data_cfg.apply_chat_template, data_cfg)
        check_prompt_content(prompt, text, ids, tokenizer, where, data_cfg.prompt_key)
        try:
            cut = truncate_prompt(ids, data_cfg.max_prompt_length, side)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if cut is None:
            too_long += 1
            continue
        if len(cut) < len(ids):
            too_long += 1
            text, ids = tokenizer.decode(list(cut), skip_special_tokens=False), cut
        row = where.rsplit(" ", 1)[-1]
        examples.append(Example(f"{stem}:{row}", text, ids, answer,
                                row_verifier(verifier, record), None, stem, record))
    if too_long:
        logger.warning(
            "%s: %s %d of %d prompts longer than data.max_prompt_length=%d tokens",
            path,
            "dropped" if side == "drop" else f"{side}-truncated",
            too_long,
            len(records),
            data_cfg.max_prompt_length,
        )
    if not examples:
        raise DataError(
            f"{path}: every prompt is longer than data.max_prompt_length="
            f"{data_cfg.max_prompt_length} tokens"
        )
    return examples


def _read_file_records(path: Path) -> list[tuple[str, dict]]:
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported data file type '{path.suffix}' "
            f"(expected one of: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return _read_records(path)
