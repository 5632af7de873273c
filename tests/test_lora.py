"""model.lora: adapters through PEFT. Only adapters train (fp32, alone in the optimizer), the
merged model is base + (alpha/r) B A, a missing target module is one line, and an end-to-end
tiny run with a custom reward file trains adapters with the HF engine on-policy."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, sets

from hapo_cli.errors import HapoError
from hapo_cli.models import build_tiny_model, build_tokenizer
from hapo_cli.recipe import LoraConfig, TinyModelConfig

pytest.importorskip("peft")

from hapo_cli.lora import apply_lora, split_state  # noqa: E402


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    return build_tiny_model(TinyModelConfig(), tok), tok


def batch(tok):
    ids = torch.tensor([tok("12+34-5=41#", add_special_tokens=False)["input_ids"]] * 2)
    return {"input_ids": ids, "labels": ids}


def test_only_adapters_train_in_fp32():
    model, tok = tiny()
    model = apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)  # 2 layers x 2 x (A, B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch(tok)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # B (from 0) by its gradient; A by AdamW weight decay at least
    assert len(opt.state) == len(trainable)  # Adam state for the adapters only


def test_merged_is_base_plus_scaled_ba():
    model, tok = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=4, alpha=12, target_modules="all-linear")
    model = apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B is 0 at start: give it values so the merge has something to add
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    state = model.state_dict()
    merged, adapters = split_state(state, cfg.alpha / cfg.rank)
    assert set(merged) == set(base)  # the base model's own names
    q = "model.layers.0.self_attn.q_proj"
    a, b = adapters[f"{q}.lora_A.default.weight"], adapters[f"{q}.lora_B.default.weight"]
    # W' = W + (alpha / r) B A = W + 3 B A
    torch.testing.assert_close(merged[f"{q}.weight"], base[f"{q}.weight"] + 3.0 * b @ a)
    torch.testing.assert_close(merged[f"{q}.bias"], base[f"{q}.bias"])
    # the merged weights in a plain model compute what the adapted model computes
    plain, _ = tiny()
    plain.load_state_dict(merged)
    with torch.no_grad():
        ids = batch(tok)["input_ids"]
        torch.testing.assert_close(plain(ids).logits, model(ids).logits)


def test_missing_target_module_is_one_line():
    model, _ = tiny()
    with pytest.raises(HapoError, match=r"model.lora.target_modules: 'c_attn' is not a linear "
                       r"layer of this model \(its linear layers: q_proj, k_proj, v_proj, o_proj"):
        apply_lora(model, LoraConfig(target_modules=["q_proj", "c_attn"]))


LEN_BONUS = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1 for the right final answer, plus a bonus for a short response (verl style)."""
    right = solution_str.rsplit("#", 1)[-1].strip() == ground_truth
    short = len(solution_str) <= 12
    return {"score": float(right) + 0.2 * short, "short": float(short)}
'''


@pytest.mark.slow
def test_lora_run_with_custom_reward(tmp_path, cache_dir):
    from typer.testing import CliRunner

    from hapo_cli.cli import app

    reward = tmp_path / "len_bonus.py"
    reward.write_text(textwrap.dedent(LEN_BONUS))
    out = tmp_path / "run"
    lora = ["model.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}",
            f"data.rewards=[{{function: '{reward}:compute_score'}}]", "train.lr=1e-3"]
    res = CliRunner().invoke(app, ["train", "--recipe", "tiny/dapo", "--max-steps", "2",
                                   "--output", str(out), *sets(cache_dir, *lora)])
    assert res.exit_code == 0, res.output
    rows = [r for r in read_metrics(out) if "actor/behaviour_logp_gap" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["actor/behaviour_logp_gap"] < 1e-5  # the HF engine samples with the adapters
        assert "reward/compute_score/mean" in r and "reward/compute_score/short" in r
        assert r["reward/compute_score/errors"] == 0
    # the end of the run exports the merged model: base names, W + (alpha/r) B A where adapted
    from safetensors.torch import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    base = load_file(str(next(Path(manifest["policy_path"]).glob("*.safetensors"))))
    # HF checkpoints hold the merged model and the adapters; DCP ones (which restore the
    # adapters with the rest) export the merged model at the end of the run
    ckpt, export = out / "checkpoints" / "step-000002", out / "exports" / "step-000002"
    folder = ckpt if (ckpt / "model.safetensors").is_file() else export
    if folder == ckpt:
        adapters = load_file(str(ckpt / "lora_adapters.safetensors"))
        assert json.loads((ckpt / "lora_config.json").read_text())["rank"] == 4
        assert any(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)
    merged = load_file(str(folder / "model.safetensors"))
    assert set(merged) == set(base)  # no lora_A / base_layer names
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(merged[q], base[q])  # adapted and trained
    torch.testing.assert_close(merged[k], base[k], rtol=0, atol=0)  # no adapter: unchanged
    # the checkpoint's model is the merged one: a plain HF model evaluate can load
    res = CliRunner().invoke(app, ["evaluate", str(out), "--bench", "arith", "--n", "1",
                                   "--limit", "4", "--temperature", "1.0"])
    assert res.exit_code == 0, res.output
    # a target module this model lacks: one line, exit 2
    res = CliRunner().invoke(app, ["train", "--recipe", "tiny/dapo", "--max-steps", "1",
                                   "--output", str(tmp_path / "bad"),
                                   *sets(cache_dir, "model.lora={target_modules: [c_attn]}")])
    assert res.exit_code == 2 and "'c_attn' is not a linear layer" in res.output
