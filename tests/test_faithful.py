"""Issue #14: the HAPO authors' reward, warm-up schedule, prompt truncation and forking-token
baseline, with expected values worked by hand (the arithmetic is in the comments)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hapo_cli import algo
from hapo_cli.data import DataError, Example, load_examples
from hapo_cli.data.files import row_verifier, truncate_prompt
from hapo_cli.learner.schedule import build_lr_scheduler, warmup_factor
from hapo_cli.models import build_tokenizer
from hapo_cli.recipe import DataConfig, OverlongConfig, TrainConfig
from hapo_cli.rewards import extract_answer, score_responses, verify
from hapo_cli.rewards.dapo import dapo_prediction, extract_answer_line, normalize_answer

DATA = Path(__file__).parent / "data"


# ---- the authors' grader (math_dapo.compute_score) ----------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("34", "34"),
        ("x = \\frac12", "\\frac{1}{2}"),  # after the last '=', \fracab -> \frac{a}{b}
        ("1,000 dollars", "1000"),  # spaces, unit and thousands separator go
        ("$\\boxed{5}$", "5"),  # first $...$ span, then \boxed{...}, then '$' removed
        ("10^\\circ", "10"),  # degree sign deleted
        ("\\text{(B)}", "(B)"),  # \text{...} unwrapped
        ("\\sqrt2", "\\sqrt{2}"),  # \sqrta -> \sqrt{a}
        ("[INVALID]", "[INVALID]"),  # no rule touches the no-answer marker
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_line_extraction():
    # the last match of (?i)Answer\s*:\s*([^\n]+) wins, case-insensitive, up to the line end
    assert extract_answer_line("Answer: 3\nso\nanswer : 4\n") == "4"
    assert extract_answer_line("ANSWER:7 apples") == "7 apples"
    assert extract_answer_line("The answer is \\boxed{34}") == "[INVALID]"
    # only the last 300 characters count: an Answer line 301+ characters from the end is lost
    far = "Answer: 34\n" + "x" * 300
    assert extract_answer_line(far) == "[INVALID]"
    assert extract_answer_line("Answer: 34\n" + "x" * 289) == "34"  # 11 + 289 = 300 characters
    assert dapo_prediction("...\nAnswer: $1,000$ dollars") == "1000"


@pytest.mark.parametrize(
    "response, answer, dapo, math",
    [
        ("reasoning...\nAnswer: 34", "34", True, True),
        ("Answer: x = 34", "34", True, True),  # the text after '=' is compared
        ("Answer: \\frac{1}{2}", "0.5", True, True),  # strings differ; math-verify fallback
        ("Answer: 0.5", "\\frac{1}{2}", True, True),  # fallback the other way round
        ("The answer is \\boxed{34}", "34", False, True),  # no Answer: line -> [INVALID], -1
        ("Answer: 35", "34", False, False),
        # outside the authors' 300-character tail; math-verify reads the whole response
        ("Answer: 34\n" + "x" * 300, "34", False, True),
    ],
)
def test_dapo_verifier_vs_math_verifier(response, answer, dapo, math):
    assert verify("dapo", response, answer) is dapo
    assert verify("math", response, answer) is math


def test_dapo_majority_vote_key():
    assert extract_answer("dapo", "work\nAnswer: 1,000") == "1000"
    assert extract_answer("dapo", "no answer line") is None


def _ex(answer: str, verifier: str) -> Example:
    return Example("u", "p", (1,), answer, verifier, None, "t")


def test_reward_scale_plus_minus_one_with_overlong_penalty():
    examples = [_ex("34", "dapo"), _ex("34", "dapo"), _ex("34", "dapo")]
    texts = ["Answer: 34", "Answer: 35", "Answer: 34"]
    lengths = [3, 8, 10]  # max 10, buffer 4: free up to 6 tokens, then -(len - 6)/4
    cfg = OverlongConfig(enabled=True, buffer_len=4, penalty=1.0)
    scores, acc = score_responses(examples, texts, lengths, 10, cfg, incorrect_score=-1.0)
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.0, 1.0]))
    # 3 -> +1 + 0; 8 -> -1 - 2/4 = -1.5; 10 -> +1 - 4/4 = 0
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.5, 0.0]))
    # 0/1 scale (tiny recipes): 1 + 0, 0 - 0.5, 1 - 1; the full penalty (1) is the whole gap
    scores01, _ = score_responses(examples, texts, lengths, 10, cfg)
    torch.testing.assert_close(scores01, torch.tensor([1.0, -0.5, 0.0]))
    assert TrainConfig().incorrect_score == 0.0


def test_row_verifier_follows_verl_data_source_dispatch():
    assert row_verifier("source", {"data_source": "math_dapo"}) == "dapo"
    assert row_verifier("source", {"data_source": "aime24"}) == "math"
    assert row_verifier("source", {}) == "math"
    assert row_verifier("dapo", {"data_source": "aime24"}) == "dapo"


def test_shipped_dapo_file_with_source_verifier():
    tok = build_tokenizer()
    cfg = DataConfig(max_prompt_length=4096, train_verifier="source")
    rows = load_examples(DATA / "dapo_tiny.parquet", cfg, tok, cfg.train_verifier)
    import pyarrow.parquet as pq

    sources = pq.read_table(DATA / "dapo_tiny.parquet").column("data_source").to_pylist()
    assert [e.verifier for e in rows] == [
        "dapo" if "math_dapo" in s else "math" for s in sources
    ]


# ---- LR warm-up ----------------------------------------------------------------------------


def test_warmup_factor_by_hand():
    # verl (get_constant_schedule_with_warmup): k/n below n, then 1 -> step 0 trains at lr 0
    assert [warmup_factor(k, 10, "zero") for k in range(12)] == [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0
    ]
    # hapo's own: (k+1)/n, capped at 1 -> the first step already trains at lr/n
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0, "zero") == 1.0 and warmup_factor(3, 0) == 1.0
    with pytest.raises(ValueError, match="start='linear'"):
        warmup_factor(0, 10, "linear")


def test_verl_schedule_per_training_step():
    # paper recipes: 512 prompts / mini-batch 32 = 16 optimizer steps per training step, all at the
    # lr of that training step; the scheduler steps once per training step (warmup_unit=training)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-6)
    cfg = TrainConfig(lr=1e-6, warmup_steps=10, warmup_unit="training", warmup_start="zero")
    sched = build_lr_scheduler(opt, cfg)
    lrs = []
    for _step in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        for _mini in range(16):
            opt.step()
        sched.step()
    expected = [0.0, 1e-7, 2e-7, 3e-7, 4e-7, 5e-7, 6e-7, 7e-7, 8e-7, 9e-7, 1e-6, 1e-6]
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64))
    # the old per-optimizer-step schedule ends its 10-step warm-up inside training step 1
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-6)
    sched2 = build_lr_scheduler(opt2, TrainConfig(lr=1e-6, warmup_steps=10))
    for _ in range(9):
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-6)  # (9 + 1)/10


# ---- prompt truncation ---------------------------------------------------------------------


def test_truncate_prompt_by_hand():
    ids = (1, 2, 3, 4, 5, 6)
    assert truncate_prompt(ids, 4, "left") == (3, 4, 5, 6)  # keeps the end (generation prompt)
    assert truncate_prompt(ids, 4, "right") == (1, 2, 3, 4)
    assert truncate_prompt(ids, 4, "drop") is None
    assert truncate_prompt(ids, 6, "left") == ids  # not longer: untouched
    with pytest.raises(DataError, match="longer than data.max_prompt_length=4"):
        truncate_prompt(ids, 4, "error")


def test_left_truncation_when_loading(caplog):
    tok = build_tokenizer()
    full = load_examples(DATA / "prompts_string.jsonl", DataConfig(), tok)
    cut = load_examples(DATA / "prompts_string.jsonl",
                        DataConfig(max_prompt_length=5, truncation="left"), tok)
    assert len(cut) == len(full)  # nothing dropped
    for a, b in zip(full, cut):
        assert b.prompt_ids == a.prompt_ids[-5:]
        assert b.prompt == tok.decode(list(a.prompt_ids[-5:]), skip_special_tokens=False)
    with pytest.raises(DataError, match="line 1: prompt of"):
        load_examples(DATA / "prompts_string.jsonl",
                      DataConfig(max_prompt_length=5, truncation="error"), tok)


# ---- forking-token baseline (arXiv 2506.01939) ---------------------------------------------


def test_forking_threshold_is_global_across_ranks():
    # two ranks: rank 0 holds entropies [1, 2], rank 1 [3, 4]; q = 0.5
    rank0 = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # local quantile 0.5 of [1, 2] = 1.5 -> rank 0 would train its token 2
    assert algo.forking_token_mask(rank0, mask, quantile=0.5).tolist() == [[False, True]]
    # global quantile 0.5 of [1, 2, 3, 4] = 2.5 -> rank 0 trains nothing, rank 1 both tokens
    thr = algo.quantile_1d(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, "paper")
    assert thr == 2.5
    assert algo.forking_token_mask(rank0, mask, 0.5, threshold=thr).tolist() == [[False, False]]
    rank1 = torch.tensor([[3.0, 4.0]])
    assert algo.forking_token_mask(rank1, mask, 0.5, threshold=thr).tolist() == [[True, True]]


def test_forking_normaliser_keeps_dapo_scale():
    # 4 valid tokens, 1 forking token (entropy 4 >= quantile 0.8 of [1,2,3,4] = 3.4), adv 2,
    # ratio 1: the paper's objective is sum_t I[forking] * (-adv * ratio) / |all tokens|
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    fork = algo.forking_token_mask(entropy, mask, quantile=0.2)
    assert fork.tolist() == [[False, False, False, True]]
    logp = torch.zeros(1, 4)
    adv = torch.full((1, 4), 2.0)
    all_tokens, _ = algo.policy_loss(logp, logp, adv, fork, 0.2, 0.2, normalizer=4.0)
    fork_only, _ = algo.policy_loss(logp, logp, adv, fork, 0.2, 0.2, normalizer=1.0)
    torch.testing.assert_close(all_tokens, torch.tensor(-0.5))  # -2 / 4
    torch.testing.assert_close(fork_only, torch.tensor(-2.0))  # -2 / 1: 1/q = 4x larger here


# ---- evaluation ----------------------------------------------------------------------------


def test_adaptive_setting_takes_a_base_temperature():
    from hapo_cli.errors import HapoError
    from hapo_cli.evaluate import Setting

    s = Setting.parse("adaptive,adaptive@0.5", greedy=False)
    assert [(x.label, x.temperature, x.adaptive) for x in s] == [
        ("adaptive", None, True),  # None: the run's eval.temperature (1.0 without a run)
        ("adaptive@0.5", 0.5, True),
    ]
    with pytest.raises(HapoError, match="expected adaptive@T"):
        Setting.parse("adaptive@hot", greedy=False)
