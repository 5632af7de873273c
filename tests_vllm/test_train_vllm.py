"""`hapo train` / `hapo evaluate` with the real vLLM engine (CPU build), end to end through the
CLI in subprocesses (each its own vLLM worker, as a user runs it).

`actor/behaviour_logp_gap` is the mean |vLLM's log-prob - the learner's recomputation| over a
step's tokens. With A off (tiny/dapo) both are log_softmax(logits / T) of the same fp32 weights,
so it measures the weight sync: ~5e-7 when the engine has the learner's weights, ~1e-2 with a
stale layer (the tied-head bug) or the wrong checkpoint (the --resume bug). Bar: 1e-5."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rows import assert_same_rows  # tests/rows.py (tests_vllm/conftest.py)
from safetensors.torch import load_file

from analysis import schema

ROOT = Path(__file__).resolve().parent.parent
GAP = "actor/behaviour_logp_gap"
SMALL = [
    "model.warmup.steps=150", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
    "train.micro_batch_size=8", "rollout.n=4", "eval.limit=8", "eval.n=2", "eval.every=2",
    "train.dynamic_sampling.enabled=false", "log.checkpoint_every=2",
]


def hapo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "hapo_cli.cli", *args], capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-3000:]
    return res


def train_args(recipe: str, out: Path, cache: Path, *extra: str, steps: int = 4,
               small: list[str] = SMALL) -> list[str]:
    args = ["train", "--recipe", recipe, "--max-steps", str(steps), "--output", str(out)]
    for s in [*small, f"model.cache_dir={cache}", "rollout.engine=vllm", *extra]:
        args += ["--set", s]
    return args


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / schema.METRICS).read_text().splitlines() if x.strip()]


def trained(run: Path) -> list[dict]:
    return [r for r in rows(run) if r["step"] > 0 and not r.get("skipped")]


def assert_synced_every_step(run: Path) -> None:
    steps = trained(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r[GAP] < 1e-5, (run.name, r["step"], r[GAP])
        # the learner really moved between syncs, so a stale engine would show
        assert r["actor/grad_norm"] > 0 and r["actor/ratio_dev_mean"] >= 0


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def dapo_run(tmp_path_factory, cache) -> Path:
    """tiny/dapo (A off) with the vLLM engine, 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "dapo"
    hapo(*train_args("tiny/dapo", out, cache))
    return out


def test_tiny_hapo_runs_on_vllm_with_nothing_else_set(tmp_path, cache):
    """The demo's recipe (tiny/hapo) with only the engine switched: CPU defaults do the rest."""
    out = tmp_path / "hapo"
    args = ["train", "--recipe", "tiny/hapo", "--max-steps", "3", "--output", str(out)]
    for s in [*SMALL, f"model.cache_dir={cache}", "rollout.engine=vllm"]:
        args += ["--set", s]
    res = hapo(*args)
    assert "run done" in res.stdout
    steps = trained(out)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # A on, scored at the base T (policy_temperature=base): the gap is A's temperature
        # change, finite and positive; T_t came from the learner's entropies (never NaN)
        assert math.isfinite(r[GAP]) and r[GAP] > 0
        assert math.isfinite(r["rollout/temperature_mean"])
    assert steps[0]["rollout/temperature_mean"] == pytest.approx(1.0)  # step 1: no stats yet
    assert steps[1]["rollout/temperature_mean"] != pytest.approx(1.0, abs=1e-6)


def test_gap_after_every_sync_tied_head(dapo_run):
    assert_synced_every_step(dapo_run)


def test_gap_after_every_sync_untied_head(tmp_path, cache, dapo_run):
    """The warm-up policy with its head untied (a copy of the embedding), trained as a
    pretrained model: embedding and head then move apart and both must reach vLLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("warmup-"))
    model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(warm)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight.data.copy_(model.get_input_embeddings().weight.data)
    model.lm_head = head
    untied = tmp_path / "untied-model"
    model.save_pretrained(untied)
    tok.save_pretrained(untied)
    assert "lm_head.weight" in load_file(untied / "model.safetensors")  # really saved untied
    out = tmp_path / "untied"
    pretrained = [s for s in SMALL if not s.startswith("model.warmup.")]  # no warm-up to size
    hapo(*train_args("tiny/dapo", out, cache, "model.init=pretrained", f"model.path={untied}",
                     small=pretrained))
    assert_synced_every_step(out)


def test_first_step_after_resume_samples_from_the_checkpoint(tmp_path, dapo_run):
    """Resume from step 2: the engine must start from checkpoint 2, not the warm-up policy.
    Steps 3-4 then equal the uninterrupted run's (same seeds, same weights)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(dapo_run, resumed)
    shutil.rmtree(resumed / schema.CHECKPOINTS_DIR / "step-000004")
    recipe = (resumed / schema.RECIPE).read_text()
    cache = Path([ln for ln in recipe.splitlines() if "cache_dir" in ln][0].split(": ")[1])
    hapo(*train_args("tiny/dapo", resumed, cache), "--resume")
    full, again = rows(dapo_run), rows(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in full]
    step3 = next(r for r in again if r["step"] == 3)
    assert step3[GAP] < 1e-5, step3[GAP]
    # the same computation from the same fp32 weights; 1e-6 relative covers the summation-order
    # noise of a fresh process
    assert_same_rows(full, again, rel=1e-6, abs=1e-7)


def evaluate(run: Path, engine: str, name: str, *extra: str) -> list[dict]:
    hapo("evaluate", str(run), "--engine", engine, "--bench", "arith", "--n", "2", "--limit",
         "8", "--name", name, *extra)
    return [json.loads(x) for x in (run / schema.EVAL_DIR / f"{name}.jsonl").read_text()
            .splitlines()]


def test_evaluate_with_vllm_adaptive_gives_finite_critical_tokens(dapo_run):
    got = evaluate(dapo_run, "vllm", "vllm-adaptive", "--temperature", "1.0,adaptive")
    assert [r["setting"] for r in got] == ["T=1", "adaptive"]
    for r in got:
        for k in ("critical_tokens_mean", "critical_entropy_threshold", "temperature_mean"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["setting"], k, r[k])
        assert r["critical_tokens_mean"] > 0
    assert got[0]["temperature_mean"] == 1.0
    assert got[1]["temperature_mean"] != pytest.approx(1.0, abs=1e-6)  # A acted (run's stats)


def test_evaluate_greedy_vllm_equals_hf(dapo_run):
    """Greedy decoding is engine-independent and the entropies come from the same HF model, so
    with a fixed threshold every number of the greedy row agrees across engines."""
    fixed = ["--temperature", "1.0", "--greedy", "--critical-entropy", "0.5"]
    v = evaluate(dapo_run, "vllm", "v-greedy", *fixed)[-1]
    h = evaluate(dapo_run, "hf", "h-greedy", *fixed)[-1]
    assert v["setting"] == h["setting"] == "greedy"
    for k in ("avg@1", "response_len_mean", "critical_tokens_mean", "truncation_rate"):
        assert v[k] == pytest.approx(h[k], abs=1e-9), k


LAUNCH = {  # strategy -> (accelerate launch arguments, the manifest's strategy)
    "ddp": (["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"], "ddp"),
    "fsdp": (["--config_file", "recipes/accelerate/fsdp.yaml"], "fsdp2"),
    "zero2": (["--config_file", "recipes/accelerate/zero2.yaml"], "deepspeed"),
    "zero3": (["--config_file", "recipes/accelerate/zero3.yaml"], "deepspeed"),
}


@pytest.mark.parametrize("strategy", list(LAUNCH))
def test_two_processes_match_one(tmp_path, cache, dapo_run, strategy):
    """A 2-process `accelerate launch` (gloo on CPU), each rank with its own vLLM engine
    (external_launcher) fed the learner's gathered weights after every step (FSDP2: DTensor
    `full_tensor`; ZeRO-3: `GatheredParameters`), matches the 1-process run step by step.
    FSDP2 here caught rank 1 training from unloaded weights under transformers 5.19
    (`Strategy.loading`)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="make test-vllm installs the deepspeed extra")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed next to the interpreter"
    two = tmp_path / "two"
    launch, kind = LAUNCH[strategy]
    if strategy == "fsdp":  # a user's config with transformers' rank-0-only loading on
        cfg = tmp_path / "fsdp.yaml"
        text = (ROOT / launch[1]).read_text()
        assert "fsdp_cpu_ram_efficient_loading: false" in text
        cfg.write_text(text.replace("fsdp_cpu_ram_efficient_loading: false",
                                    "fsdp_cpu_ram_efficient_loading: true"))
        launch = ["--config_file", str(cfg)]
    res = subprocess.run([accelerate, "launch", *launch, "--num_processes", "2",
                          "--mixed_precision", "no", "-m", "hapo_cli.cli",
                          *train_args("tiny/dapo", two, cache)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((two / schema.MANIFEST).read_text())
    assert (manifest["world_size"], manifest["strategy"]) == (2, kind)
    if strategy == "zero3":
        assert manifest["zero_stage"] == 3 and manifest["sharded"]
    a, b = rows(dapo_run), rows(two)
    # DDP all-reduces gradients in another summation order (as tests/test_distributed_e2e.py)
    assert_same_rows(a, b, rel=1e-4, abs=1e-6)


LORA = ["model.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}",
        "train.lr=1e-3"]


def assert_only_adapters_changed(run: Path) -> None:
    """The run's last checkpoint: the merged model differs from its base exactly in the adapted
    layers' weights (B A trained away from 0); every other tensor is the base's, bit for bit."""
    manifest = json.loads((run / schema.MANIFEST).read_text())
    base = load_file(str(next(Path(manifest["policy_path"]).glob("*.safetensors"))))
    ckpt = run / schema.CHECKPOINTS_DIR / "step-000004"
    merged = load_file(str(ckpt / "model.safetensors"))
    assert set(merged) == set(base)
    adapted = {k for k in base if k.rsplit(".", 2)[-2] in ("q_proj", "v_proj", "up_proj")
               and k.endswith(".weight")}
    assert len(adapted) == 6  # 2 layers x 3 modules
    for k, v in merged.items():
        if k in adapted:
            assert not torch.equal(v, base[k]), k
        else:
            assert torch.equal(v, base[k]), k
    adapters = load_file(str(ckpt / "lora_adapters.safetensors"))
    assert len(adapters) == 12 and all(".lora_A." in k or ".lora_B." in k for k in adapters)


def test_lora_merged_weights_reach_vllm_after_every_step(tmp_path, cache):
    """model.lora with the colocated engine: after every optimizer step vLLM gets W + (alpha/r)
    B A under the base names (`lora.engine_weights`). The gap stays at fp32 noise (~5e-7);
    the same run with the base weights alone sent measured 3e-3, 1e-2, 2e-2 at steps 2-4."""
    out = tmp_path / "lora"
    hapo(*train_args("tiny/dapo", out, cache, *LORA))
    assert_synced_every_step(out)
    assert_only_adapters_changed(out)
