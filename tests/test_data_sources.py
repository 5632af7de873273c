"""Data sources beyond parquet/jsonl (save_to_disk folders, hf:NAME[:CONFIG][@SPLIT] through
`datasets`, offline) and prompt shaping (system_prompt, prompt_template, chat_template_kwargs)
seen in the prompt's token ids."""

from __future__ import annotations

import pandas as pd
import pytest

from hapo_cli.data import build_val_sets, load_benchmark, load_examples
from hapo_cli.data.sources import SourceError, check_source, source_name
from hapo_cli.models import build_tokenizer
from hapo_cli.recipe import DataConfig, RecipeError, load_recipe

datasets = pytest.importorskip("datasets")

ROWS = [
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": f"what is {i}+{i}"}],
     "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
    for i in range(1, 6)
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a test never downloads


@pytest.fixture
def sources(tmp_path):
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(splits))
    hub = tmp_path / "hub_like"  # a local dataset folder that load_dataset resolves itself
    hub.mkdir()
    pd.DataFrame(ROWS).to_parquet(hub / "train.parquet")
    return {"parquet": parquet, "folder": folder, "splits": splits, "hub": hub}


def prompts(examples):
    return [(e.prompt, e.prompt_ids, e.answer, e.verifier) for e in examples]


def test_save_to_disk_folder_and_parquet_give_the_same_prompts(sources):
    tok, cfg = build_tokenizer(), DataConfig(source="files", train_files=["x"])
    from_parquet = load_examples(sources["parquet"], cfg, tok, "source")
    from_folder = load_examples(str(sources["folder"]), cfg, tok, "source")
    assert prompts(from_folder) == prompts(from_parquet)
    assert [e.prompt for e in from_folder][:2] == ["what is 1+1", "what is 2+2"]
    assert from_folder[0].verifier == "dapo"  # data_source math_dapo, as from the parquet
    assert from_folder[0].row["extra_info"] == {"index": 1}  # the row reaches reward functions
    from_hf = load_examples(f"hf:{sources['hub']}", cfg, tok, "source")
    assert prompts(from_hf) == prompts(from_parquet)


def test_dataset_dict_folder_needs_a_split(sources):
    tok, cfg = build_tokenizer(), DataConfig()
    test = load_examples(f"{sources['splits']}@test", cfg, tok)
    assert [e.answer for e in test] == ["8", "10"]
    with pytest.raises(SourceError, match=r"holds the splits train, test; name one as .*@train"):
        load_examples(str(sources["splits"]), cfg, tok)
    with pytest.raises(SourceError, match="cannot be loaded by datasets"):
        load_examples(f"hf:{sources['hub']}@validation", cfg, tok)  # no such split


def test_names_and_checks(sources, tmp_path):
    assert source_name("hf:openai/gsm8k:main@test") == "gsm8k-main"
    assert source_name(f"{sources['splits']}@test") == "splits"
    assert source_name(sources["parquet"]) == "rows"
    check_source(str(sources["folder"]), "data.train_files")
    with pytest.raises(SourceError, match="data.val_files: .*nothing: no such file or folder"):
        check_source(str(tmp_path / "nothing"), "data.val_files")
    with pytest.raises(SourceError, match="expected hf:NAME"):
        check_source("hf::main", "data.train_files")
    tok = build_tokenizer()
    cfg = DataConfig(source="files", train_files=["x"], val_files=[str(sources["folder"])])
    assert list(build_val_sets(cfg, tok)) == ["saved"]
    name, examples = load_benchmark(f"{sources['splits']}@train", cfg, tok, limit=2)
    assert name == "splits" and len(examples) == 2


def test_missing_hf_dataset_offline_is_one_line():
    with pytest.raises(SourceError, match="hf:no-such-org/no-such-set: cannot be loaded"):
        load_examples("hf:no-such-org/no-such-set", DataConfig(), build_tokenizer())


# A chat template in the tiny tokenizer's alphabet: role=content; per message, then the
# generation prompt, and 'nothink' when enable_thinking is false (as Qwen3's template).
TEMPLATE = ("{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}assistant="
            "{% if enable_thinking is defined and not enable_thinking %}nothink {% endif %}")


def test_prompt_shaping_in_the_prompt_tokens(sources):
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    cfg = DataConfig(system_prompt="be brief", prompt_template="{prompt}, answer in #",
                     chat_template_kwargs={"enable_thinking": False})
    ex = load_examples(sources["parquet"], cfg, tok)[0]
    want = "system=be brief;user=what is 1+1, answer in #;assistant=nothink "
    assert tok.decode(list(ex.prompt_ids)) == want  # what the model gets, token by token
    assert ex.prompt_ids == tuple(tok(want, add_special_tokens=False)["input_ids"])
    plain = load_examples(sources["parquet"], DataConfig(), tok)[0]
    assert tok.decode(list(plain.prompt_ids)) == "user=what is 1+1;assistant="
    # synthetic tasks are shaped too (held-out sets, benchmarks)
    _, arith = load_benchmark("arith", cfg, tok, limit=1)
    assert tok.decode(list(arith[0].prompt_ids)).startswith("system=be brief;user=")
    assert "answer in #;assistant=nothink " in arith[0].prompt


def test_prompt_template_braces_and_placeholder():
    tok = build_tokenizer()
    cfg = DataConfig(prompt_template="{prompt} (boxed{})")  # other braces stay as written
    _, ex = load_benchmark("arith", cfg, tok, limit=1)
    assert ex[0].prompt.endswith("= (boxed{})")  # the text; '{' is not in this vocabulary
    with pytest.raises(RecipeError, match="prompt_template.*must contain '{prompt}'"):
        load_recipe("tiny/dapo", ["data.prompt_template=answer briefly"])


def test_recipes_show_prints_the_rendered_prompt():
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    res = CliRunner().invoke(app, ["recipes", "show", "tiny/dapo", "--prompt", "--set",
                                   "data.prompt_template={prompt} think"])
    assert res.exit_code == 0, res.output
    comment = res.output.splitlines()[-2:]
    assert comment[0].startswith("# first training prompt,") and "tokens" in comment[0]
    assert comment[1].startswith("#   ") and comment[1].endswith("= think")
