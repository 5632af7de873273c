"""Fixtures of the real-vLLM suite: tiny Qwen2 models (tied and untied heads) saved locally, and
one in-process vLLM engine per model for the whole session (an engine starts in seconds but
holds its worker's process-wide state; building one per test would only cost time)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import vllm  # noqa: F401  (no importorskip: this suite must fail, not skip, without vLLM)

from hapo_cli.models import build_tokenizer, quiet_transformers
from hapo_cli.recipe import VllmConfig

# tests/rows.py (assert_same_rows) is shared with the CPU suite
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def tiny_policy(tied: bool, seed: int = 0):
    """A random Qwen2ForCausalLM of the embedded tiny size (hidden 64, 2 heads: head_dim 32),
    its weights scaled up so its distributions are far from uniform (entropies spread)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    quiet_transformers()
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
        tie_word_embeddings=tied, use_sliding_window=False, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        # initializer std 0.02 gives near-uniform next-token distributions (entropy ~3.9 of a
        # possible 3.93); these scales give mean entropies ~1-2.5 nats (a tied head also scales
        # the embeddings, hence the smaller factor)
        model.get_output_embeddings().weight.mul_(4.0 if tied else 16.0)
    return model, tok


def save_policy(model, tok, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_engine(path: Path, seed: int = 0):
    from hapo_cli.rollout.vllm import VLLMEngine

    return VLLMEngine(str(path), VllmConfig(), max_model_len=128, dtype="float32", seed=seed)


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def policy(request, tmp_path_factory):
    """(HF model, tokenizer, vLLM engine loaded from the same weights, tied)."""
    tied = request.param
    model, tok = tiny_policy(tied)
    path = save_policy(model, tok, tmp_path_factory.mktemp("tied" if tied else "untied"))
    return model, tok, build_engine(path), tied
