"""The tiny policy: character tokenizer, Qwen2 model, cached warm-up, loading."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoTokenizer

import hapo_cli.models as models
from hapo_cli.data import heldout_examples
from hapo_cli.model_dirs import check_tokenizer, load_tokenizer
from hapo_cli.models import (
    ModelError,
    build_tiny_model,
    build_tokenizer,
    load_policy,
    resolve_policy_path,
    warmup_policy,
)
from hapo_cli.recipe import DataConfig, ModelConfig, TinyModelConfig, WarmupConfig

TINY = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def _cfg(tmp_path, steps: int = 3, seed: int = 0, target: float | None = 0.3) -> ModelConfig:
    return ModelConfig(
        init="warmup",
        cache_dir=str(tmp_path / "cache"),
        tiny=TINY,
        warmup=WarmupConfig(steps=steps, batch_size=8, seed=seed, target_acc=target),
    )


def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.padding_side == "left" and tok.chat_template is None
    text = "47+38=85;85-19=66;#66"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id, 0], skip_special_tokens=True) == text
    assert tok("a?", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.padding_side == "left" and len(loaded) == len(tok)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text and loaded.eos_token == "<eos>"
    batch = loaded(["1+1=", "12+30="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [0, 0]  # left padding survives the round trip


def test_a_policy_folder_reloads_the_tokenizer_it_was_saved_with(tmp_path):
    """Next to a qwen2 config.json, transformers 5's AutoTokenizer picks Qwen2Tokenizer, whose
    own pre-tokenizer dropped the tiny tokenizer's spaces ("be brief" -> "bebrief"): every run
    that reloads the policy folder (train, evaluate, export) must get the same ids."""
    tok = build_tokenizer()
    build_tiny_model(TinyModelConfig(), tok).config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text = "be brief. 12+3= 15"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    loaded = load_tokenizer(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text and loaded.padding_side == "left"
    check_tokenizer(tmp_path)  # the cheap pre-flight check loads it the same way


def test_tiny_model_forward_and_ties():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TINY, tok)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.eos_token_id == 1 and model.config.pad_token_id == 0
    ids = torch.tensor([tok("12+3=", add_special_tokens=False)["input_ids"]] * 2)  # (2, 5)
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 5, len(tok))
    with pytest.raises(ValueError, match="hidden_size=16 must be a multiple of num_heads=3"):
        TinyModelConfig(hidden_size=16, num_heads=3)  # a load-time recipe error now


def test_warmup_builds_once_then_hits_cache(tmp_path, monkeypatch):
    cfg, data = _cfg(tmp_path), DataConfig()
    seen = []
    path = warmup_policy(cfg, data, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert path.parent == tmp_path / "cache" and path.name.startswith("warmup-")
    info = json.loads((path / "warmup.json").read_text())
    assert info["task"] == "arith" and info["difficulty"] == 2 and info["heldout_size"] == 200
    assert 0.0 <= info["heldout_greedy_acc"] <= 1.0
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(models, "train_warmup", no_training)
    assert warmup_policy(cfg, data) == path
    assert resolve_policy_path(cfg, data) == path
    # another difficulty is another policy (and would train: the patched trainer raises)
    with pytest.raises(AssertionError, match="cache hit expected"):
        warmup_policy(cfg, DataConfig(difficulty=3))


def test_warmup_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    warmup_policy(_cfg(tmp_path), DataConfig())  # builds (seeds torch inside)
    torch.testing.assert_close(torch.rand(3), expected)


def test_concurrent_builders_train_once(tmp_path, monkeypatch):
    calls = []
    real = models.train_warmup

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "train_warmup", counting)
    cfg, results = _cfg(tmp_path, steps=2), []
    threads = [
        threading.Thread(target=lambda: results.append(warmup_policy(cfg, DataConfig())))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_warmup_is_deterministic_and_loads(tmp_path):
    a = warmup_policy(_cfg(tmp_path / "a"), DataConfig())
    b = warmup_policy(_cfg(tmp_path / "b"), DataConfig())
    assert a.name == b.name  # same content hash
    ma, tok = load_policy(a)
    mb, _ = load_policy(b, dtype="float32")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert tok.padding_side == "left" and tok.eos_token_id == 1
    assert next(ma.parameters()).dtype == torch.float32
    m16, _ = load_policy(a, dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    ex = heldout_examples("arith", 2, 8, tok)
    assert 0.0 <= models._greedy_accuracy(ma, tok, ex) <= 1.0
    rows = models._sample_correct(ma, tok, ex, max_new_tokens=4, n=3, do_sample=True)
    assert len(rows) == 8 and all(len(r) == 3 for r in rows)


def test_warmup_stops_at_the_target_accuracy(tmp_path):
    # target 0: the first probe (step 25) already reaches it; progress ends full at 25/25
    seen = []
    path = warmup_policy(
        _cfg(tmp_path, steps=40, target=0.0), DataConfig(),
        progress=lambda d, t: seen.append(d if d < 25 else (d, t)),
    )
    info = json.loads((path / "warmup.json").read_text())
    assert info["steps_run"] == 25 and info["target_acc"] == 0.0 and info["probe_acc"] >= 0.0
    assert seen == [*range(1, 25), (25, 25)]
    # no target (None): all steps run
    path = warmup_policy(_cfg(tmp_path, steps=30, target=None), DataConfig())
    info = json.loads((path / "warmup.json").read_text())
    assert info["steps_run"] == 30 and info["target_acc"] is None and info["probe_acc"] is None


def test_warmup_seed_changes_the_key(tmp_path):
    data = DataConfig()
    assert models.warmup_key(_cfg(tmp_path, seed=0), data) != models.warmup_key(
        _cfg(tmp_path, seed=1), data
    )
    assert models.warmup_key(_cfg(tmp_path), data) != models.warmup_key(
        _cfg(tmp_path), DataConfig(task="add")
    )


def test_warmup_needs_synthetic_data(tmp_path):
    with pytest.raises(ValueError, match="needs data.source='synthetic'"):
        warmup_policy(_cfg(tmp_path), DataConfig(source="files", train_files=["x.jsonl"]))


def test_pretrained_path_errors(tmp_path):
    data = DataConfig()
    with pytest.raises(ModelError, match="model.path=.*nowhere: not a local directory"):
        resolve_policy_path(ModelConfig(path=str(tmp_path / "nowhere")), data)
    with pytest.raises(ModelError, match="no config.json"):
        resolve_policy_path(ModelConfig(path=str(tmp_path)), data)
    with pytest.raises(ModelError, match="model.path is required"):
        resolve_policy_path(ModelConfig(), data)
    tok = build_tokenizer()
    build_tiny_model(TINY, tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert resolve_policy_path(ModelConfig(path=str(tmp_path / "m")), data) == tmp_path / "m"
    model, loaded = load_policy(tmp_path / "m")
    assert model.config.hidden_size == 16 and len(loaded) == len(tok)
