"""The merged weights an engine that loads weights (vLLM) receives under model.lora:
`lora.engine_weights` streams W + scale * B A under the base model's names, from the live
model without changing it, equal to the checkpoint's merged state (`split_state`)."""

from __future__ import annotations

import random

import pytest
import torch

from hapo_cli.models import build_tiny_model, build_tokenizer
from hapo_cli.recipe import LoraConfig, TinyModelConfig

pytest.importorskip("peft")

from hapo_cli.lora import apply_lora, engine_weights, split_state  # noqa: E402


def lora_model(cfg: LoraConfig, seed: int = 0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    base = build_tiny_model(TinyModelConfig(), tok)
    plain = {k: v.clone() for k, v in base.named_parameters()}  # the base model's own names
    model = apply_lora(base, cfg)
    with torch.no_grad():  # B starts at 0: give it values so the merge adds something
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    return model, plain, tok


def test_engine_weights_are_the_checkpoints_merged_state_and_leave_the_model_alone():
    cfg = LoraConfig(rank=4, alpha=12, target_modules=["q_proj", "v_proj", "up_proj"])
    model, plain, tok = lora_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = dict(engine_weights(model, model.named_parameters()))
    assert set(got) == set(plain)  # base names: no lora_A / lora_B / base_layer
    merged, _ = split_state(model.state_dict(), cfg.alpha / cfg.rank)
    for k, v in got.items():  # bit for bit what a checkpoint holds (same fp32 formula)
        torch.testing.assert_close(v, merged[k], rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj"
    a = model.get_parameter(f"{q}.lora_A.default.weight")
    b = model.get_parameter(f"{q}.lora_B.default.weight")
    # W' = W + (12 / 4) B A, by hand
    torch.testing.assert_close(got[f"{q}.weight"], plain[f"{q}.weight"] + 3.0 * b @ a)
    k = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the live tensor itself
    assert got[k] is model.get_parameter(k)
    for n, p in model.named_parameters():  # nothing in the live model changed
        assert torch.equal(p, before[n]), n
    # the merged weights in a plain model compute what the adapted model computes
    torch.manual_seed(0)
    fresh = build_tiny_model(TinyModelConfig(), tok)
    fresh.load_state_dict(got, strict=False)
    ids = torch.tensor([tok("12+34-5=41#", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model.eval()(ids).logits)


def test_any_order_and_wrapper_names():
    """FSDP2/DDP gathers come in named_parameters order; the merge does not rely on it, and a
    DDP `module.` or a PeftModel's `base_model.model.` prefix maps back to the base names."""
    cfg = LoraConfig(rank=2, alpha=2, target_modules="all-linear")
    model, plain, _ = lora_model(cfg, seed=1)
    pairs = list(model.named_parameters())
    random.Random(0).shuffle(pairs)
    wrapped = [(f"module.base_model.model.{n}", p) for n, p in pairs]
    got = dict(engine_weights(model, iter(wrapped)))
    want = dict(engine_weights(model, model.named_parameters()))
    assert set(got) == set(want) == set(plain)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_a_full_model_passes_through_and_a_missing_b_is_an_error():
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(), build_tokenizer())
    pairs = list(model.named_parameters())
    assert list(engine_weights(model, iter(pairs))) == pairs  # no adapters: as they came
    lora, _, _ = lora_model(LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]))
    cut = [(n, p) for n, p in lora.named_parameters() if not n.endswith("lora_B.default.weight")]
    with pytest.raises(RuntimeError, match=r"q_proj: got only \['A', 'W'\]"):
        list(engine_weights(lora, iter(cut)))
