"""Prompt sources: synthetic tasks, prompt streams, parquet/jsonl loading, benchmarks."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from hapo_cli.data import (
    TASKS,
    DataError,
    FileStream,
    SyntheticStream,
    build_train_stream,
    build_val_sets,
    heldout_examples,
    load_benchmark,
    load_examples,
)
from hapo_cli.data.synthetic import (
    ARITH_LEVELS,
    HELDOUT_SEED,
    is_heldout_prompt,
    synthetic_item,
)
from hapo_cli.models import build_tokenizer
from hapo_cli.recipe import DataConfig

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    """The character tokenizer with a toy chat template: 'system|user' + '=' as the
    generation prompt."""
    t = build_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}|{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    return t


def _eval_steps(target: str) -> int:
    """Oracle for arith: re-compute each written step with int arithmetic (no eval)."""
    *steps, final = target.split(";")
    value = None
    for step in steps:
        lhs, rhs = step.split("=")
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", lhs).groups()
        if value is not None:
            assert int(a) == value  # each step starts from the previous result
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(rhs) == value
    assert final == f"#{value}"
    return value


# ---------------------------------------------------------------------------------------------
# synthetic tasks
# ---------------------------------------------------------------------------------------------


def test_arith_first_examples_by_hand():
    # seed 1, difficulty 2 (3 operands in [0, 99]); the arithmetic checked by hand:
    # 2+52 = 54, 54-46 = 8;  2+16 = 18, 18-16 = 2;  99-53 = 46, 46+35 = 81
    got = [synthetic_item("arith", 2, "train", 1, i) for i in range(3)]
    assert [(x.prompt, x.target, x.answer) for x in got] == [
        ("2+52-46=", "2+52=54;54-46=8;#8", "8"),
        ("2+16-16=", "2+16=18;18-16=2;#2", "2"),
        ("99-53+35=", "99-53=46;46+35=81;#81", "81"),
    ]


def test_add_and_mul_first_examples_by_hand():
    # 128+187: 8+7=15 (carry 1), 2+8+1=11 (carry 1), 1+1+1=3 -> 315
    assert synthetic_item("add", 2, "train", 1, 0).target == "8+7=15;2+8+1=11;1+1+1=3;#315"
    # 21*21 = 21*20 + 21*1 = 420 + 21 = 441;  80*20 has one non-zero digit in 20: one step
    assert synthetic_item("mul", 3, "train", 1, 0).target == "21*20=420;21*1=21;420+21=441;#441"
    assert synthetic_item("mul", 3, "train", 1, 2).target == "80*20=1600;#1600"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_is_a_pure_function_of_its_key(task):
    # example 7 drawn alone equals the 8th of a sequence, and again on a second call
    seq = [synthetic_item(task, 3, "train", 5, i) for i in range(8)]
    assert synthetic_item(task, 3, "train", 5, 7) == seq[7]
    assert [synthetic_item(task, 3, "train", 5, i) for i in range(8)] == seq
    # another seed, split or difficulty gives another stream
    assert [synthetic_item(task, 3, "train", 6, i) for i in range(8)] != seq
    assert [synthetic_item(task, 3, "warmup", 5, i) for i in range(8)] != seq
    assert [synthetic_item(task, 4, "train", 5, i) for i in range(8)] != seq


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arith_difficulty_sets_operands_and_range(difficulty):
    n_operands, hi = ARITH_LEVELS[difficulty]
    items = [synthetic_item("arith", difficulty, "train", 0, i) for i in range(300)]
    biggest = 0
    for x in items:
        assert len(re.findall(r"\d+", x.prompt)) == n_operands
        assert x.target.count(";") == n_operands - 1  # one step per operation, then '#'
        assert str(_eval_steps(x.target)) == x.answer
        numbers = [int(v) for v in re.findall(r"\d+", x.target)]
        assert all(0 <= v <= hi for v in numbers)
        biggest = max(biggest, *numbers)
    assert biggest > hi // 2  # the range is used, not just its bottom


def test_add_and_mul_answers_are_right():
    for d in range(1, 6):
        for i in range(50):
            x = synthetic_item("add", d, "train", 0, i)
            a, b = map(int, x.prompt[:-1].split("+"))
            assert len(str(a)) == d + 1 and x.answer == str(a + b)
            assert x.target.count(";") == d + 1  # one column per digit
            y = synthetic_item("mul", d, "train", 0, i)
            a, b = map(int, y.prompt[:-1].split("*"))
            assert y.answer == str(a * b) and y.target.endswith(f"#{a * b}")


def test_heldout_prompts_never_in_training_streams():
    held = {synthetic_item("arith", 2, "heldout", HELDOUT_SEED, i).prompt for i in range(100)}
    assert all(is_heldout_prompt(p) for p in held)
    for split, seed in (("train", 1), ("train", 2), ("warmup", 0)):
        train = {synthetic_item("arith", 2, split, seed, i).prompt for i in range(2000)}
        assert not train & held
        assert not any(is_heldout_prompt(p) for p in train)


def test_unknown_task_and_difficulty_are_errors():
    with pytest.raises(ValueError, match="known tasks are add, arith, mul"):
        synthetic_item("nope", 2, "train", 0, 0)
    with pytest.raises(ValueError, match="difficulty=9"):
        synthetic_item("arith", 9, "train", 0, 0)


# ---------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------


def test_synthetic_stream_examples_and_state_round_trip(tok):
    stream = SyntheticStream("arith", 2, 1, tok)
    first = stream.next_batch(3)
    assert [ex.prompt for ex in first] == ["2+52-46=", "2+16-16=", "99-53+35="]
    ex = first[0]
    assert ex.verifier == "exact" and ex.answer == "8" and ex.task == "arith"
    assert ex.target == "2+52=54;54-46=8;#8"
    assert tok.decode(list(ex.prompt_ids)) == ex.prompt and len(ex.prompt_ids) == 8
    state = stream.state_dict()
    assert state == {"index": 3, "epoch": 0}
    expected = stream.next_batch(5)
    again = SyntheticStream("arith", 2, 1, tok)
    again.load_state_dict(state)
    assert again.next_batch(5) == expected
    with pytest.raises(ValueError, match="index, epoch"):
        again.load_state_dict({"index": 1})


def test_file_stream_shuffles_per_epoch_and_resumes(tok):
    examples = load_examples(DATA / "prompts_string.jsonl", DataConfig(), tok)  # 3 rows
    stream = FileStream(examples, seed=4)
    epochs = [stream.next_batch(3) for _ in range(4)]
    for batch in epochs:  # every epoch is a permutation of the rows
        assert sorted(ex.uid for ex in batch) == sorted(ex.uid for ex in examples)
    assert len({tuple(ex.uid for ex in b) for b in epochs}) > 1  # order changes with epoch
    assert stream.state_dict() == {"index": 3, "epoch": 3}
    # resume mid-epoch: same continuation
    a = FileStream(examples, seed=4)
    a.next_batch(5)  # epoch 1, index 2
    assert a.state_dict() == {"index": 2, "epoch": 1}
    b = FileStream(examples, seed=4)
    b.load_state_dict(a.state_dict())
    assert b.next_batch(7) == a.next_batch(7)
    unshuffled = FileStream(examples, seed=4, shuffle=False).next_batch(6)
    assert [ex.uid for ex in unshuffled] == [ex.uid for ex in examples] * 2


def test_build_train_stream_and_val_sets_synthetic(tok):
    cfg = DataConfig(task="add", difficulty=1, val_size=7)
    stream = build_train_stream(cfg, tok, seed=3)
    assert stream.next_batch(1)[0].prompt == synthetic_item("add", 1, "train", 3, 0).prompt
    vals = build_val_sets(cfg, tok)
    assert list(vals) == ["add"] and len(vals["add"]) == 7
    assert vals["add"] == heldout_examples("add", 1, 7, tok)  # fixed: independent of the seed


def test_build_train_stream_and_val_sets_files(tok):
    cfg = DataConfig(
        source="files",
        train_files=[str(DATA / "prompts_string.jsonl"), str(DATA / "dapo_tiny.parquet")],
        val_files=[str(DATA / "prompts_chat.jsonl")],
    )
    stream = build_train_stream(cfg, tok, seed=0)
    assert {ex.task for ex in stream.next_batch(6)} == {"prompts_string", "dapo_tiny"}
    vals = build_val_sets(cfg, tok)
    assert list(vals) == ["prompts_chat"] and len(vals["prompts_chat"]) == 2


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_jsonl_string_prompts(tok):
    ex = load_examples(DATA / "prompts_string.jsonl", DataConfig(), tok)
    assert [e.answer for e in ex] == ["\\frac{3}{4}", "42", "7"]  # 42: a number, as a string
    assert ex[0].prompt == "what is 1/2 + 1/4?" and ex[0].verifier == "math"
    assert ex[0].target is None and ex[0].task == "prompts_string"
    # the blank line 3 is skipped; uids name the 1-based line
    assert [e.uid for e in ex] == ["prompts_string:1", "prompts_string:2", "prompts_string:4"]
    assert len(ex[0].prompt_ids) == len("what is 1/2 + 1/4?")  # one token per character


def test_jsonl_chat_prompts_with_and_without_template(tok, chat_tok):
    plain = load_examples(DATA / "prompts_chat.jsonl", DataConfig(), tok)
    assert plain[1].prompt == "be brief\nwhat is 2*3?"  # no template: contents joined
    templ = load_examples(DATA / "prompts_chat.jsonl", DataConfig(), chat_tok)
    assert [e.prompt for e in templ] == ["solve x+1=3=", "be brief|what is 2*3?="]
    assert chat_tok.decode(list(templ[0].prompt_ids)) == "solve x+1=3="
    off = load_examples(
        DATA / "prompts_chat.jsonl", DataConfig(apply_chat_template=False), chat_tok
    )
    assert off[0].prompt == "solve x+1=3"


def test_parquet_verl_layout(chat_tok):
    ex = load_examples(DATA / "dapo_tiny.parquet", DataConfig(), chat_tok)
    assert [(e.prompt, e.answer) for e in ex] == [
        ("what is 1+2?=", "3"),
        ("what is 9-4?=", "5"),
        ("half of 1?=", "\\frac{1}{2}"),
    ]
    assert [e.uid for e in ex] == ["dapo_tiny:1", "dapo_tiny:2", "dapo_tiny:3"]


def test_mapped_columns(tok):
    cfg = DataConfig(prompt_key="question", answer_key="solution")
    ex = load_examples(DATA / "prompts_mapped.jsonl", cfg, tok)
    assert [(e.prompt, e.answer) for e in ex] == [("what is 3+4?", "7"), ("what is 5+5?", "10")]


def test_long_prompts_are_filtered_and_counted(tok, caplog):
    # prompt lengths in characters = tokens: 18, 12, 13; keep those <= 13
    cfg = DataConfig(max_prompt_length=13)
    with caplog.at_level(logging.WARNING, logger="hapo.data"):
        ex = load_examples(DATA / "prompts_string.jsonl", cfg, tok)
    assert [e.answer for e in ex] == ["42", "7"]
    assert "dropped 1 of 3 prompts" in caplog.text
    with pytest.raises(DataError, match="every prompt is longer"):
        load_examples(DATA / "prompts_string.jsonl", DataConfig(max_prompt_length=5), tok)


def test_malformed_records_name_file_and_line(tok):
    with pytest.raises(DataError, match=r"malformed_json\.jsonl line 3: not valid JSON"):
        load_examples(DATA / "malformed_json.jsonl", DataConfig(), tok)
    with pytest.raises(
        DataError, match=r"missing_answer\.jsonl line 2: missing key 'reward_model.ground_truth'"
    ):
        load_examples(DATA / "missing_answer.jsonl", DataConfig(), tok)
    with pytest.raises(DataError, match=r"prompts_mapped\.jsonl line 1: missing key 'prompt'"):
        load_examples(DATA / "prompts_mapped.jsonl", DataConfig(), tok)


def test_bad_prompt_and_answer_types(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": 5, "reward_model": {"ground_truth": "1"}}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: prompt must be a string"):
        load_examples(p, DataConfig(), tok)
    p.write_text('{"prompt": "x", "reward_model": {"ground_truth": ["1", "2"]}}\n')
    with pytest.raises(DataError, match="must be a string or number"):
        load_examples(p, DataConfig(), tok)
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        load_examples(p, DataConfig(), tok)


def test_missing_file_and_unsupported_extension(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl", DataConfig(), tok)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.csv'"):
        load_examples(csv, DataConfig(), tok)
    bad = tmp_path / "broken.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_examples(bad, DataConfig(), tok)


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------


def test_load_benchmark(tok):
    cfg = DataConfig(val_size=5)
    name, ex = load_benchmark("arith", cfg, tok)
    assert name == "arith" and ex == heldout_examples("arith", 2, 5, tok)
    name, ex = load_benchmark("arith:3", cfg, tok, limit=2)
    assert name == "arith:3" and ex == heldout_examples("arith", 3, 2, tok)
    name, ex = load_benchmark(str(DATA / "dapo_tiny.parquet"), cfg, tok, limit=2)
    assert name == "dapo_tiny" and len(ex) == 2
    with pytest.raises(DataError, match=r"unknown benchmark 'gsm8k'.*known: add, arith, mul"):
        load_benchmark("gsm8k", cfg, tok)
    with pytest.raises(DataError, match="difficulty must be an integer in 1-5"):
        load_benchmark("arith:x", cfg, tok)
    with pytest.raises(FileNotFoundError):
        load_benchmark("missing.parquet", cfg, tok)
