"""vLLM engine logic that runs without vLLM: the logits-processor plugin's arithmetic and state,
request building, output parsing, weight-name mapping, and the engine's wiring against a fake
`vllm` module. The same engine against real vLLM (its CPU build) is tests_vllm/, run by
`make test-vllm`; scripts/vllm_smoke.py checks it on CUDA."""

from __future__ import annotations

import json
import sys
import types
from enum import Enum
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hapo_cli.algo import EntropyStats, adaptive_temperature
from hapo_cli.recipe import RolloutConfig, VllmConfig
from hapo_cli.rollout import (
    AdaptiveTemperatureLogitsProcessor,
    SamplingSpec,
    recompute_adaptive_temperature,
)
from hapo_cli.rollout.factory import build_engine
from hapo_cli.rollout.vllm import (
    build_requests,
    hf_to_vllm_name,
    named_weights,
    parse_outputs,
    request_seed,
    sampling_kwargs,
)
from hapo_cli.rollout.vllm_plugin import (
    HapoAdaptiveTemperature,
    HapoAdaptiveTemperatureV1,
    HapoRequestParams,
    scale_rows,
)

V = 40
STATS = EntropyStats(rho=0.9, std=0.4, scale_pos=1.5, scale_neg=2.0)
STATS_B = EntropyStats(rho=0.2, std=0.8, scale_pos=1.0, scale_neg=1.0)
RELEASED = EntropyStats(rho=0.5, std=0.3, scale_pos=1.2, scale_neg=-1.5, mode="released")


def spread_logits(n: int, seed: int = 0) -> torch.Tensor:
    """(n, V) logits whose rows range from near-uniform to peaked (entropies ~0.5 to ~3.6)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 6.0, n).unsqueeze(1)
    return torch.randn(n, V, generator=g) * scale


def request(params: HapoRequestParams | None, temperature: float = 1.0):
    extra = None if params is None else {"hapo": params.to_extra_args()}
    return SimpleNamespace(extra_args=extra, temperature=temperature)


def hf_reference(logits: torch.Tensor, params: HapoRequestParams):
    proc = AdaptiveTemperatureLogitsProcessor(params.temperature, params.tau, params.stats)
    return proc(None, logits.clone()), proc.last_temperature


# ---------------------------------------------------------------------------------------------
# plugin arithmetic: must agree with the transformers processor on the same logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stats", [STATS, RELEASED, None], ids=["paper", "released", "none"])
def test_plugin_arithmetic_matches_hf_processor(stats):
    logits = spread_logits(8)
    params = HapoRequestParams(temperature=0.9, tau=0.3, stats=stats)
    expected, expected_t = hf_reference(logits, params)
    out, temps = scale_rows(logits.clone(), [params] * 8)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(temps, expected_t)
    if stats is not None:
        assert temps.max() - temps.min() > 0.1  # the rows really get different T_t


def test_plugin_v2_per_slot_params_match_hf_processor():
    logits = spread_logits(5, seed=1)
    pa = HapoRequestParams(1.0, 0.5, STATS)
    pb = HapoRequestParams(0.6, 0.2, STATS_B)
    plugin = HapoAdaptiveTemperature(None, SimpleNamespace(max_num_reqs=8))
    assert plugin.add_request(6, request(pa)) is True
    assert plugin.add_request(2, request(pb)) is True
    assert plugin.add_request(4, request(None)) is False  # not a hapo request
    # batch rows -> slots: row 0 is slot 2 (pb), rows 1 and 3 slot 6 (pa), 2 slot 4 (none)
    ctx = SimpleNamespace(idx_mapping_np=np.array([2, 6, 4, 6, 2]))
    out = plugin.apply(logits.clone(), ctx)
    exp_a, _ = hf_reference(logits, pa)
    exp_b, _ = hf_reference(logits, pb)
    for row, exp in [(0, exp_b), (1, exp_a), (3, exp_a), (4, exp_b)]:
        torch.testing.assert_close(out[row], exp[row])
    torch.testing.assert_close(out[2], logits[2], rtol=0, atol=0)  # untouched


def test_plugin_v2_slot_reuse_and_speculative_rows_rejected():
    plugin = HapoAdaptiveTemperature(None, SimpleNamespace(max_num_reqs=2))
    plugin.add_request(0, request(HapoRequestParams(2.0, 0.0, None)))
    plugin.add_request(0, request(None))  # slot recycled for a plain request
    logits = spread_logits(1)
    out = plugin.apply(logits.clone(), SimpleNamespace(idx_mapping_np=np.array([0])))
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="speculative"):
        plugin.apply(spread_logits(3), SimpleNamespace(idx_mapping_np=np.array([0])))


class Move(Enum):
    UNIDIRECTIONAL = 1
    SWAP = 2


def test_plugin_v1_batch_updates():
    pa = HapoRequestParams(1.0, 0.5, STATS)
    pb = HapoRequestParams(0.5, 0.0, None)
    plugin = HapoAdaptiveTemperatureV1(None, None, False)
    assert plugin.is_argmax_invariant() is False  # runs before vLLM's temperature
    upd = SimpleNamespace(
        batch_size=3,
        removed=[],
        moved=[],
        added=[(0, request(pa), [1], []), (1, request(None), [1], []), (2, request(pb), [1], [])],
    )
    plugin.update_state(upd)
    # swap rows 0 and 2, then move row 2 (now pa) to row 1: rows are {0: pb, 1: pa}
    plugin.update_state(
        SimpleNamespace(
            batch_size=3,
            removed=[],
            added=[],
            moved=[(0, 2, Move.SWAP), (2, 1, Move.UNIDIRECTIONAL)],
        )
    )
    logits = spread_logits(2, seed=2)
    out = plugin.apply(logits.clone())
    torch.testing.assert_close(out[0], hf_reference(logits, pb)[0][0])
    torch.testing.assert_close(out[1], hf_reference(logits, pa)[0][1])
    plugin.update_state(SimpleNamespace(batch_size=1, removed=[0, 1], added=[], moved=[]))
    torch.testing.assert_close(plugin.apply(logits.clone()), logits, rtol=0, atol=0)
    plugin.update_state(None)  # no change


def test_validate_params():
    ok = HapoRequestParams(0.8, 0.05, STATS)
    HapoAdaptiveTemperature.validate_params(request(ok))
    HapoAdaptiveTemperature.validate_params(request(None, temperature=0.5))  # not hapo: fine
    with pytest.raises(ValueError, match="temperature=1.0"):
        HapoAdaptiveTemperature.validate_params(request(ok, temperature=0.8))
    with pytest.raises(ValueError, match="needs keys"):
        HapoAdaptiveTemperatureV1.validate_params(
            SimpleNamespace(extra_args={"hapo": {"T": 1.0}}, temperature=1.0)
        )
    with pytest.raises(ValueError, match="must be > 0"):
        HapoRequestParams(0.0, 0.1, None)


def test_request_params_survive_json():
    p = HapoRequestParams(0.7, 0.05, RELEASED)
    back = HapoRequestParams.from_extra_args(json.loads(json.dumps(p.to_extra_args())))
    assert back == p


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


def test_sampling_kwargs_plain_adaptive_greedy():
    plain = sampling_kwargs(
        SamplingSpec(n=4, temperature=0.7, top_p=0.9, max_new_tokens=9),
        None,
        seed=11,
        stop_token_ids=[1],
    )
    assert plain == {
        "n": 4,
        "max_tokens": 9,
        "logprobs": 0,
        "detokenize": False,
        "stop_token_ids": [1],
        "top_p": 0.9,
        "top_k": 0,
        "seed": 11,
        "temperature": 0.7,
    }
    spec_a = SamplingSpec(n=4, temperature=0.7, max_new_tokens=9, adaptive=True, tau=0.05)
    adaptive = sampling_kwargs(spec_a, STATS, seed=11)
    # A: vLLM's own temperature is 1 and the plugin divides by the whole T_t
    assert adaptive["temperature"] == 1.0
    assert adaptive["extra_args"] == {
        "hapo": {"temperature": 0.7, "tau": 0.05, "stats": STATS.to_dict()}
    }
    first_step = sampling_kwargs(spec_a, None, seed=11)
    assert first_step["extra_args"]["hapo"]["stats"] is None
    greedy = sampling_kwargs(SamplingSpec(n=4, temperature=0.7, greedy=True), STATS, seed=1)
    assert greedy["temperature"] == 0.0 and greedy["n"] == 1 and "extra_args" not in greedy


def test_build_requests_and_seeds():
    prompts, params = build_requests([[5, 6], [7]], SamplingSpec(n=3, temperature=1.0), None, 9)
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert [p["seed"] for p in params] == [request_seed(9, 0, 3), request_seed(9, 1, 3)]
    # vLLM seeds the j-th sample of a request with seed + j: no two samples share a seed
    seeds = {request_seed(9, i, 3) + j for i in range(50) for j in range(3)}
    assert len(seeds) == 150
    assert request_seed(9, 0, 3) != request_seed(10, 0, 3)
    g_prompts, g_params = build_requests(
        [[5, 6], [7]], SamplingSpec(n=2, temperature=1.0, greedy=True), None, 0
    )
    assert [p["prompt_token_ids"] for p in g_prompts] == [[5, 6], [5, 6], [7], [7]]
    assert all(p["n"] == 1 for p in g_params)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def completion(index, ids, logps, reason):
    lps = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(ids, logps, strict=True)]
    return SimpleNamespace(index=index, token_ids=ids, logprobs=lps, finish_reason=reason)


def fake_outputs():
    return [
        SimpleNamespace(
            outputs=[  # out of order on purpose: sorted by .index
                completion(1, [4, 1], [-0.5, -0.25], "stop"),
                completion(0, [3, 3, 3], [-1.0, -2.0, -3.0], "length"),
            ]
        ),
        SimpleNamespace(
            outputs=[
                completion(0, [1], [-0.125], "stop"),
                completion(1, [7, 8, 9], [-0.5, -0.5, -0.5], "length"),
            ]
        ),
    ]


def test_parse_outputs_plain():
    spec = SamplingSpec(n=2, temperature=0.5, max_new_tokens=3)
    batch = parse_outputs(fake_outputs(), num_prompts=2, spec=spec, pad_token_id=0)
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.response_ids.tolist() == [[3, 3, 3], [4, 1, 0], [1, 0, 0], [7, 8, 9]]
    assert batch.response_len.tolist() == [3, 2, 1, 3]
    assert batch.finish_reason == ["length", "eos", "eos", "length"]
    torch.testing.assert_close(
        batch.behaviour_logp,
        torch.tensor(
            [[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0], [-0.125, 0.0, 0.0], [-0.5, -0.5, -0.5]]
        ),
    )
    m = batch.response_mask
    assert (batch.temperature[m] == 0.5).all() and (batch.temperature[~m] == 0).all()
    assert batch.entropy[m].isnan().all() and (batch.entropy[~m] == 0).all()
    assert not batch.decode_stats and not batch.logp_includes_truncation


def test_parse_outputs_adaptive_and_truncated():
    spec = SamplingSpec(n=2, temperature=0.5, top_k=5, max_new_tokens=3, adaptive=True)
    batch = parse_outputs(fake_outputs(), 2, spec, pad_token_id=0)
    assert batch.temperature[batch.response_mask].isnan().all()
    assert batch.truncation and batch.logp_includes_truncation


def test_parse_outputs_errors():
    spec = SamplingSpec(n=2, temperature=1.0)
    with pytest.raises(RuntimeError, match="expected 6"):
        parse_outputs(fake_outputs(), 3, spec, 0)
    bad = fake_outputs()
    bad[0].outputs[0].finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        parse_outputs(bad, 2, spec, 0)
    bad = fake_outputs()
    bad[1].outputs[1].logprobs = None
    with pytest.raises(RuntimeError, match="logprobs=0"):
        parse_outputs(bad, 2, spec, 0)


def test_with_decode_stats_fills_vllm_batches():
    spec = SamplingSpec(n=2, temperature=0.5, max_new_tokens=3, adaptive=True, tau=0.3)
    batch = parse_outputs(fake_outputs(), 2, spec, pad_token_id=0)
    ent = torch.rand(4, 3) * 2 + 0.1
    filled = batch.with_decode_stats(ent, 0.5, 0.3, STATS)
    m = batch.response_mask
    assert filled.decode_stats
    torch.testing.assert_close(filled.entropy[m], ent[m])
    torch.testing.assert_close(
        filled.temperature[m], recompute_adaptive_temperature(ent, 0.5, 0.3, STATS)[m]
    )
    assert (filled.temperature[~m] == 0).all()


@pytest.mark.parametrize("stats", [STATS, RELEASED, None], ids=["paper", "released", "none"])
def test_recompute_temperature_from_entropy_matches_logits_path(stats):
    # the entropy-only formula must agree with algo.adaptive_temperature, which starts from logits
    logits = spread_logits(10, seed=3)
    p = torch.softmax(logits.double(), -1)
    ent = -(p * p.log()).sum(-1).float()
    torch.testing.assert_close(
        recompute_adaptive_temperature(ent, 0.8, 0.4, stats),
        adaptive_temperature(logits, 0.8, 0.4, stats),
    )


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def test_weight_name_mapping():
    assert hf_to_vllm_name("module.model.layers.0.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert hf_to_vllm_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    names = [n for n, _ in named_weights(torch.nn.DataParallel(net))]
    assert names == ["0.weight", "0.bias"]
    pairs = list(named_weights([("module.a.weight", torch.ones(2, requires_grad=True))]))
    assert pairs[0][0] == "a.weight" and not pairs[0][1].requires_grad


# ---------------------------------------------------------------------------------------------
# the engine against a fake vllm module
# ---------------------------------------------------------------------------------------------


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list = []
        self.loaded: list[str] = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return SimpleNamespace(eos_token_id=1, pad_token_id=0)

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", prompts, params))
        outs = []
        for i, (_p, sp) in enumerate(zip(prompts, params, strict=True)):
            outs.append(
                SimpleNamespace(
                    outputs=[completion(j, [2 + i, 1], [-0.5, -0.25], "stop") for j in range(sp.n)]
                )
            )
        return outs

    def collective_rpc(self, fn, args=(), kwargs=None):
        model = SimpleNamespace(load_weights=lambda ws: {self.loaded.append(n) or n for n, _ in ws})
        worker = SimpleNamespace(get_model=lambda: model)
        if isinstance(fn, str):  # a worker method by name: reload_weights on CPU
            assert fn == "reload_weights" and kwargs["is_checkpoint_format"] is True
            self.calls.append(("rpc", fn))
            return [model.load_weights(kwargs["weights_iterator"])]
        self.calls.append(("rpc", fn.__name__))
        return [fn(worker, *args)]

    def reset_prefix_cache(self):
        self.calls.append(("reset",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tags))
        return tags is None or "kv_cache" in tags


class FakeEngineArgs:
    """vllm.EngineArgs: the engine reads `use_v2_model_runner` from the config it creates."""

    use_v2 = True
    seen: list[dict] = []

    def __init__(self, **kwargs):
        FakeEngineArgs.seen.append(kwargs)

    def create_engine_config(self):
        return SimpleNamespace(use_v2_model_runner=FakeEngineArgs.use_v2)


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.33.0"
    mod.LLM = FakeLLM
    mod.EngineArgs = FakeEngineArgs
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: mod.on_cpu)
    mod.on_cpu = False
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(FakeEngineArgs, "use_v2", True)
    FakeEngineArgs.seen.clear()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    FakeLLM.instances.clear()
    return mod


def test_engine_wiring_with_fake_vllm(fake_vllm):
    import os

    cfg = RolloutConfig(
        engine="vllm", n=2, max_new_tokens=4, vllm=VllmConfig(gpu_memory_utilization=0.3)
    )
    engine = build_engine(cfg, None, None, "/models/tiny", max_prompt_length=12)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["model"] == "/models/tiny"
    assert llm.kwargs["max_model_len"] == 16  # 12 + 4
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["gpu_memory_utilization"] == 0.3
    assert llm.kwargs["logits_processors"] == [HapoAdaptiveTemperature]
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["enforce_eager"] is False
    assert "kv_cache_memory_bytes" not in llm.kwargs
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # the runner was decided from vLLM's config of the same arguments, before constructing
    assert FakeEngineArgs.seen[-1]["model"] == "/models/tiny"
    assert "logits_processors" not in FakeEngineArgs.seen[-1]

    spec = SamplingSpec(n=2, temperature=0.7, max_new_tokens=4, adaptive=True, tau=0.1)
    batch = engine.generate([[5], [6, 7]], spec, STATS, seed=3)
    _, prompts, params = llm.calls[-1]
    assert params[0].extra_args["hapo"]["stats"] == STATS.to_dict()
    assert params[0].temperature == 1.0 and params[0].stop_token_ids == [1]
    assert batch.response_ids.tolist() == [[2, 1], [2, 1], [3, 1], [3, 1]]
    assert batch.finish_reason == ["eos"] * 4

    model = torch.nn.Linear(2, 2)
    engine.sync_weights(model)
    assert llm.loaded == ["weight", "bias"] and llm.calls[-1] == ("reset",)
    assert llm.calls[-2] == ("rpc", "_load_weights_on_worker")  # CUDA: direct load_weights

    engine.sleep()
    engine.sync_weights(model)  # asleep: wake the weights only, load, keep the KV cache asleep
    engine.generate([[5]], SamplingSpec(n=1, temperature=1.0), None, 0)
    kinds = [c[:2] for c in llm.calls[-5:]]
    assert kinds == [
        ("sleep", 1),
        ("wake", ["weights"]),
        ("rpc", "_load_weights_on_worker"),
        ("wake", ["kv_cache"]),
        ("generate", [{"prompt_token_ids": [5]}]),
    ]


def test_engine_uses_the_v1_plugin_when_vllm_config_says_v1(fake_vllm, monkeypatch):
    monkeypatch.setattr(FakeEngineArgs, "use_v2", False)  # e.g. no Triton (CPU)
    build_engine(RolloutConfig(engine="vllm"), None, None, "/m")
    assert len(FakeLLM.instances) == 1  # built once, with the right class: no retry
    assert FakeLLM.instances[-1].kwargs["logits_processors"] == [HapoAdaptiveTemperatureV1]


def test_engine_on_cpu_build(fake_vllm):
    """CPU: no sleep mode, eager, explicit KV cache bytes, reload_weights + tied-head refresh."""
    fake_vllm.on_cpu = True
    cfg = RolloutConfig(engine="vllm", vllm=VllmConfig(cpu_kv_cache_gib=0.25))
    engine = build_engine(cfg, None, None, "/m")
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_sleep_mode"] is False and llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["kv_cache_memory_bytes"] == 2**28
    engine.sleep()  # no sleep mode: nothing is offloaded, nothing to wake
    engine.sync_weights(torch.nn.Linear(2, 2))
    assert llm.loaded == ["weight", "bias"]
    assert llm.calls == [("rpc", "reload_weights"), ("rpc", "_refresh_tied_lm_head"), ("reset",)]


def test_sleep_mode_on_cpu_is_a_user_error(fake_vllm):
    from hapo_cli.errors import HapoError

    fake_vllm.on_cpu = True
    cfg = RolloutConfig(engine="vllm", vllm=VllmConfig(enable_sleep_mode=True))
    with pytest.raises(HapoError, match="enable_sleep_mode"):
        build_engine(cfg, None, None, "/m")


def test_missing_vllm_gives_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="rollout.engine=hf"):
        build_engine(RolloutConfig(engine="vllm"), None, None, "/m")


def test_seed_formula_stays_in_int64():
    assert 0 <= request_seed(2**40, 10**6, 64) < 2**62


def test_sampling_spec_from_recipe_sections():
    """for_training reads only fields that exist, with the values the recipe holds."""
    from hapo_cli.recipe import load_recipe

    rec = load_recipe("tiny/hapo", ["eval.max_new_tokens=12", "rollout.top_k=5"])
    train = SamplingSpec.for_training(rec.rollout, rec.algo)
    assert (train.n, train.top_k, train.adaptive, train.tau) == (8, 5, True, rec.algo.tau)
