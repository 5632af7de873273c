"""Learner pieces: engine vs learner log-probs, dynamic sampling, batches, checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from hapo_cli import algo
from hapo_cli.learner.batch import TrainBatch, concat_batches, mixed_groups
from hapo_cli.learner.forward import response_logprobs
from hapo_cli.recipe import load_recipe
from hapo_cli.rollout import HFEngine, RolloutBatch, SamplingSpec


def tiny_model(vocab: int = 24, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return Qwen2ForCausalLM(cfg).eval()


class _Tok:
    pad_token_id = 0
    eos_token_id = 1

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(str(t) for t in s) for s in seqs]


def _batch_from(prompts, out, pad_id=0) -> tuple[torch.Tensor, torch.Tensor, int]:
    pidx = out.prompt_index.tolist()
    P = max(len(prompts[i]) for i in pidx)
    rows, masks = [], []
    for b, i in enumerate(pidx):
        p = prompts[i]
        ids = [pad_id] * (P - len(p)) + p + out.response_ids[b].tolist()
        m = [0] * (P - len(p)) + [1] * len(p) + out.response_mask[b].long().tolist()
        rows.append(ids)
        masks.append(m)
    return torch.tensor(rows), torch.tensor(masks), out.response_ids.shape[1]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_engine_behaviour_logp_equals_learner_recomputation(fused, adaptive):
    """The engine's log-prob of each sampled token equals the learner's forward pass at the
    temperature actually used: fixed T, and per-token T_t under A (policy_temperature=rollout)."""
    model = tiny_model()
    engine = HFEngine(model, _Tok(), batch_size=64)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    stats = algo.EntropyStats(rho=0.5, std=0.7, scale_pos=1.3, scale_neg=2.0, mode="paper")
    spec = SamplingSpec(n=3, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=10,
                        adaptive=adaptive, tau=0.3)
    out = engine.generate(prompts, spec, stats if adaptive else None, seed=3)
    ids, am, T = _batch_from(prompts, out)
    temp = out.temperature.masked_fill(~out.response_mask.bool(), 1.0) if adaptive else 0.8
    with torch.no_grad():
        logp, ent = response_logprobs(model, ids, am, T, temp, fused=fused, chunk_size=7)
    mask = out.response_mask.bool()
    assert_close(logp[mask], out.behaviour_logp[mask], rtol=1e-4, atol=1e-5)
    if adaptive:
        assert out.temperature[mask].std() > 0
    # the stored entropy is the untempered one; recompute it at T = 1
    with torch.no_grad():
        _, ent1 = response_logprobs(model, ids, am, T, None, fused=fused)
    assert_close(ent1[mask], out.entropy[mask], rtol=1e-4, atol=1e-5)


def _fake_rollout(prompt_ids, spec, correct_by_prompt) -> RolloutBatch:
    n, P = spec.n, len(prompt_ids)
    B, T = P * n, 4
    ids = torch.full((B, T), 3)
    # response text "3 3 3 3" for correct, "4 4 4 4" otherwise: decided per sample
    outcome = []
    for p in range(P):
        outcome += correct_by_prompt(p, n)
    for b, ok in enumerate(outcome):
        ids[b] = 3 if ok else 4
    return RolloutBatch(
        prompt_index=torch.arange(P).repeat_interleave(n), response_ids=ids,
        response_mask=torch.ones(B, T, dtype=torch.bool), behaviour_logp=torch.zeros(B, T),
        temperature=torch.ones(B, T), entropy=torch.ones(B, T), finish_reason=["eos"] * B,
        response_len=torch.full((B,), T),
    )


class _FakeEngine:
    def __init__(self, pattern):
        self.pattern = pattern
        self.calls = 0

    def generate(self, prompt_ids, spec, stats, seed, prompt_offset=0):
        self.calls += 1
        return _fake_rollout(prompt_ids, spec, lambda p, n: self.pattern(self.calls, p, n))


class _Stream:
    def __init__(self):
        self.i = 0

    def next_batch(self, n, refill=False):
        out = [SimpleNamespace(uid=f"u{self.i + k}", prompt_ids=(5, 6), answer="x",
                               verifier="exact", prompt="p") for k in range(n)]
        self.i += n
        return out


class _Sampler:
    """Stage 1 (sampling with dynamic sampling) on one process, with a fake engine and scorer."""

    def __init__(self, recipe, engine, monkeypatch):
        import hapo_cli.learner.sampling as sampling
        from hapo_cli.learner.ranks import Ranks

        def fake_score(examples, texts, lengths, max_new, overlong, incorrect_score=0.0):
            acc = torch.tensor([1.0 if t.startswith("3") else 0.0 for t in texts])
            return torch.where(acc > 0, 1.0, incorrect_score), acc

        monkeypatch.setattr(sampling, "score_responses", fake_score)
        acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"),
                              is_main_process=True)
        self.recipe, self.engine, self.ranks = recipe, engine, Ranks(acc)
        self.tok = _Tok()

    def collect(self, step):
        from hapo_cli.learner.sampling import sample_batch

        return sample_batch(self.recipe, self.engine, self.tok, _Stream(), self.ranks, step,
                            None, self.tok.pad_token_id or 0)


def _loop(recipe, engine, monkeypatch):
    return _Sampler(recipe, engine, monkeypatch)


def test_dynamic_sampling_fills_the_batch(monkeypatch):
    r = load_recipe("tiny/dapo", ["train.prompts_per_step=4", "train.mini_batch_prompts=2",
                                  "train.micro_batch_size=8", "rollout.n=4",
                                  "train.dynamic_sampling.max_num_gen_batches=5"])

    # call 1: only prompt 0 mixed; call 2: prompts 0,1 mixed; call 3: all mixed
    def pattern(call, p, n):
        mixed = p < call
        return [True] + [False] * (n - 1) if mixed else [False] * n

    eng = _FakeEngine(pattern)
    batch, info = _loop(r, eng, monkeypatch).collect(step=1)
    assert eng.calls == 3  # 1 + 2 + 3 mixed groups >= 4 after the third batch
    assert info["rollout/gen_batches"] == 3 and info["rollout/fill_rate"] == 1.0
    assert batch.num_groups == 4 and len(batch.scores) == 16
    assert mixed_groups(batch.acc, batch.group_ids).all()


def test_dynamic_sampling_stops_at_the_limit(monkeypatch):
    r = load_recipe("tiny/dapo", ["train.prompts_per_step=4", "train.mini_batch_prompts=2",
                                  "train.micro_batch_size=8", "rollout.n=4",
                                  "train.dynamic_sampling.max_num_gen_batches=2"])
    eng = _FakeEngine(lambda call, p, n: [p == 0] + [False] * (n - 1))  # 1 mixed group a call
    batch, info = _loop(r, eng, monkeypatch).collect(step=1)
    assert eng.calls == 2
    assert info["rollout/fill_rate"] == 0.5 and batch.num_groups == 2
    eng = _FakeEngine(lambda call, p, n: [False] * n)  # nothing mixed: skip the step
    batch, info = _loop(r, eng, monkeypatch).collect(step=1)
    assert batch is None and info["rollout/fill_rate"] == 0.0 and eng.calls == 2


def test_dynamic_sampling_off_keeps_everything(monkeypatch):
    r = load_recipe("tiny/grpo", ["train.prompts_per_step=4", "train.mini_batch_prompts=2",
                                  "train.micro_batch_size=8", "rollout.n=4"])
    eng = _FakeEngine(lambda call, p, n: [False] * n)
    batch, info = _loop(r, eng, monkeypatch).collect(step=1)
    assert eng.calls == 1 and batch.num_groups == 4 and info["rollout/mixed_group_frac"] == 0


def _tb(n_groups: int, g: int, T: int, P: int, seed: int) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    B = n_groups * g
    mask = torch.rand(B, T, generator=gen) > 0.3
    resp = torch.randint(2, 9, (B, T), generator=gen).masked_fill(~mask, 0)
    prompt = torch.randint(2, 9, (B, P), generator=gen)
    return TrainBatch(
        input_ids=torch.cat([prompt, resp], 1),
        attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1),
        response_ids=resp, mask=mask, behaviour_logp=torch.randn(B, T, generator=gen),
        temperature=torch.ones(B, T), rollout_entropy=torch.rand(B, T, generator=gen),
        scores=torch.rand(B, generator=gen), acc=torch.rand(B, generator=gen).round(),
        group_ids=torch.arange(n_groups).repeat_interleave(g), response_len=mask.sum(-1),
        truncated=torch.zeros(B, dtype=torch.bool), texts=[str(i) for i in range(B)],
        uids=[f"u{i // g}" for i in range(B)],
    )


def test_concat_and_select_groups_keep_tokens():
    a, b = _tb(2, 3, 5, 3, seed=0), _tb(1, 3, 7, 4, seed=1)
    c = concat_batches([a, b], pad_id=0)
    assert c.input_ids.shape == (9, 4 + 7)
    assert c.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the valid response tokens of every row are unchanged
    for src, rows in ((a, range(0, 6)), (b, range(6, 9))):
        for i, r in enumerate(rows):
            assert_close(c.response_ids[r][c.mask[r]], src.response_ids[i][src.mask[i]])
            assert_close(c.behaviour_logp[r][c.mask[r]], src.behaviour_logp[i][src.mask[i]])
    s = c.select_groups([2, 0])
    assert s.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.texts == ["0", "1", "2", "0", "1", "2"]
    assert_close(s.scores[:3], b.scores)


def test_mixed_groups():
    v = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    assert mixed_groups(v, g).tolist() == [False, False, True]


def test_checkpoint_round_trip(tmp_path):
    from hapo_cli.learner.checkpoint import (
        latest_checkpoint,
        list_checkpoints,
        load_trainer_state,
        save_checkpoint,
    )
    from hapo_cli.learner.state import LoopState
    from hapo_cli.models import build_tokenizer

    model = tiny_model()
    tok = build_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.tensor([[2, 3, 4]])).logits.sum().backward()
    opt.step()
    sched.step()

    class Stream:
        state = {"index": 7, "epoch": 0}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, d):
            self.state = dict(d)

    stats = algo.EntropyStats(rho=0.1, std=1.2, scale_pos=0.5, scale_neg=1.5, mode="paper")
    state = LoopState(step=3, entropy_stats=stats, critical_threshold=0.9,
                      last_val={"val/x/greedy": 0.5})
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tok, opt, sched, Stream(), state, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    ckpt = latest_checkpoint(tmp_path)
    opt2 = torch.optim.AdamW(tiny_model(seed=1).parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    stream2 = Stream()
    stream2.state = {}
    got = load_trainer_state(ckpt, opt2, sched2, stream2)
    assert got.step == 3 and got.entropy_stats == stats and got.critical_threshold == 0.9
    assert stream2.state == {"index": 7, "epoch": 0}
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        assert_close(s1[k]["exp_avg"], s2[k]["exp_avg"])
    from hapo_cli.models import load_policy

    m2, _ = load_policy(ckpt)
    for (n1, p1), (_, p2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert_close(p1, p2, msg=n1)


def test_refill_batches_do_not_shift_the_primary_prompts():
    """Dynamic sampling draws extra batches from the refill stream, so two variants whose
    filters keep different groups still see the same prompts at the start of every step."""
    from hapo_cli.learner.streams import build_streams
    from hapo_cli.models import build_tokenizer

    data = load_recipe("tiny/hapo").data
    tok = build_tokenizer()
    a, b = build_streams(data, tok, seed=1), build_streams(data, tok, seed=1)
    firsts_a, firsts_b = [], []
    for step in range(3):
        firsts_a.append([e.uid for e in a.next_batch(4)])
        for _ in range(step):  # variant a needs `step` refills, variant b none
            a.next_batch(4, refill=True)
        firsts_b.append([e.uid for e in b.next_batch(4)])
    assert firsts_a == firsts_b
    refill = [e.uid for e in a.next_batch(4, refill=True)]
    assert not set(refill) & {u for batch in firsts_a for u in batch}
    state = a.state_dict()
    c = build_streams(data, tok, seed=1)
    c.load_state_dict(state)
    assert [e.uid for e in c.next_batch(4)] == [e.uid for e in a.next_batch(4)]


def test_weights_for_an_unsharded_model_are_the_parameters():
    from hapo_cli.errors import HapoError
    from hapo_cli.learner.weights import check_engine_sharding, full_named_parameters, sharding_of

    model = tiny_model()
    pairs = dict(full_named_parameters(model, None))
    assert pairs.keys() == dict(model.named_parameters()).keys()
    acc = SimpleNamespace(distributed_type="DistributedType.FSDP", state=None)
    assert sharding_of(acc) == "fsdp"
    with pytest.raises(HapoError, match="rollout.engine=vllm"):
        check_engine_sharding("hf", acc)
    check_engine_sharding("vllm", acc)


def test_shard_indices_split_every_mini_batch():
    from hapo_cli.errors import HapoError
    from hapo_cli.learner.sampling import shard_indices

    # 8 prompts, mini-batch 4, 2 ranks: each rank takes half of each mini-batch, so rank 0's
    # local mini-batch 0 (prompts 0,1) and rank 1's (2,3) together form global mini-batch 0
    assert shard_indices(8, 4, 2, 0) == [0, 1, 4, 5]
    assert shard_indices(8, 4, 2, 1) == [2, 3, 6, 7]
    assert shard_indices(8, 4, 1, 0) == list(range(8))
    with pytest.raises(HapoError, match="multiple of the number of processes"):
        shard_indices(8, 3, 2, 0)


def test_mini_batches_partition_rows(monkeypatch):
    r = load_recipe("tiny/dapo", ["train.prompts_per_step=4", "train.mini_batch_prompts=2",
                                  "train.micro_batch_size=2", "rollout.n=2"])
    from hapo_cli.learner.update import mini_batches

    def parts(B):
        return mini_batches(B, r.train.mini_batch_prompts, r.rollout.n, r.train.micro_batch_size, 1)

    got = [(m.start, m.stop, [(s.start, s.stop) for s in micros]) for m, micros in parts(8)]
    # mini-batch = 2 prompts x 2 = 4 responses; micro-batches of 2 inside each; a short last
    # mini-batch (6 responses: dynamic sampling kept 3 prompts) keeps its rows
    assert got == [(0, 4, [(0, 2), (2, 4)]), (4, 8, [(4, 6), (6, 8)])]
    assert [(m.start, m.stop) for m, _ in parts(6)] == [(0, 4), (4, 6)]


def test_trust_remote_code_reaches_the_model_loader(tmp_path, monkeypatch, cache_dir):
    """`model.trust_remote_code` is passed on to from_pretrained (it was once only a field)."""
    from conftest import sets
    from typer.testing import CliRunner

    import hapo_cli.model_dirs as model_dirs
    import hapo_cli.models as models
    from hapo_cli.cli import app

    seen = []

    def recording(path, dtype="float32", trust_remote_code=False):
        seen.append(trust_remote_code)
        raise models.ModelError("stopped by the test")

    monkeypatch.setattr(model_dirs, "load_policy", recording)  # Strategy.load_policy's
    for flag in ("true", "false"):
        res = CliRunner().invoke(app, ["train", "--recipe", "tiny/hapo", "--max-steps", "1",
                                       "--output", str(tmp_path / flag),
                                       *sets(cache_dir, f"model.trust_remote_code={flag}")])
        assert res.exit_code == 2 and "stopped by the test" in res.output
    assert seen == [True, False]
