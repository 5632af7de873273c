"""Policies: the embedded tiny Qwen2 model with a character tokenizer, its cached supervised
warm-up, and loading any local HF causal LM.

The tiny policy is a real `Qwen2ForCausalLM` and a real `PreTrainedTokenizerFast` saved with
`save_pretrained`, so the learner and the rollout engines treat it exactly like a 7B model.
Nothing here ever contacts a model hub (`local_files_only=True`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .data import TASKS, Example, SyntheticStream, heldout_examples
from .data.synthetic import HELDOUT_SEED
from .errors import HapoError
from .model_dirs import (  # noqa: F401 - part of this module's API
    TOKENIZER_FILES,
    ModelError,
    check_model_dir,
    check_tokenizer,
    load_policy,
    quiet_transformers,
)
from .recipe import stable_hash
from .rewards.verify import verify

# Bump when the warm-up procedure, the tokenizer or a synthetic task changes: it is part of the
# cache key, so old cached policies are not reused by mistake.
WARMUP_VERSION = "2"  # 2: built at WARMUP_THREADS threads whoever builds it
# CPU matmuls split their reductions by thread count, so the warm-up's result depended on the
# caller's threads (`hapo ablate` at torch's default and `hapo train` at train.threads=1 built
# different policies under one cache key). Every warm-up runs at this many threads.
WARMUP_THREADS = 1

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
ALPHABET = "0123456789+-*/=;#()., abcdefghijklmnopqrstuvwxyz"
WARMUP_EVAL_SIZE = 200  # held-out prompts scored greedily into warmup.json
# The warm-up stops once greedy accuracy on WARMUP_STOP_SIZE held-out prompts (another seed
# than the validation set's) reaches the target, probed every WARMUP_CHECK_EVERY steps (every 5
# once a third of the way there). A tiny model learns these tasks abruptly (arith: 2 % -> 62 %
# between steps 200 and 400, and the step moves by hundreds with the warm-up seed), so a fixed
# step count lands anywhere on that cliff; `model.warmup.steps` is then only a cap.
# `model.warmup.target_acc` overrides the target when the recipe has that field.
WARMUP_TARGET_ACC = 0.3
WARMUP_CHECK_EVERY = 25
WARMUP_STOP_SIZE = 128

Progress = Callable[[int, int], None]  # progress(done_steps, total_steps)


# ---------------------------------------------------------------------------------------------
# tokenizer and model
# ---------------------------------------------------------------------------------------------


def build_tokenizer():
    """Character-level tokenizer: one token per character of ALPHABET, <pad>=0, <eos>=1, <unk>=2;
    left padding (for generation). No chat template, no BOS, nothing added on encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_tiny_model(tiny_cfg: Any, tokenizer: Any):
    """A randomly initialised Qwen2ForCausalLM (tied embeddings) sized by `TinyModelConfig`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(  # heads divide hidden: TinyModelConfig validates it
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads,
        num_key_value_heads=tiny_cfg.num_heads,
        intermediate_size=tiny_cfg.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


# ---------------------------------------------------------------------------------------------
# supervised warm-up
# ---------------------------------------------------------------------------------------------


def direct_fraction(warmup_cfg: Any, task: str) -> float:
    """Share of warm-up targets written as the direct answer: the recipe's
    `model.warmup.direct_fraction`, else the task's default (0 but for `steps`)."""
    frac = getattr(warmup_cfg, "direct_fraction", None)
    return TASKS[task].direct_fraction if frac is None else float(frac)


def warmup_key(model_cfg: Any, data_cfg: Any) -> str:
    """Content hash of everything the warm-up result depends on (not the thread count)."""
    parts = {
        "tiny": model_cfg.tiny.model_dump(mode="json"),
        # direct_fraction enters resolved (below), so `None` and the task's default share a key
        "warmup": model_cfg.warmup.model_dump(mode="json", exclude={"direct_fraction"}),
        "task": data_cfg.task,
        "difficulty": data_cfg.difficulty,
        "target_acc": target_accuracy(model_cfg.warmup),
        "version": WARMUP_VERSION,
    }
    frac = direct_fraction(model_cfg.warmup, data_cfg.task)
    if frac > 0:  # only then: warm-ups without direct answers keep the keys they always had
        parts["direct_fraction"] = frac
    return stable_hash(parts)


def _supervised_batch(examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
    """prompt + target + <eos>, right-padded; labels -100 on the prompt and the padding."""
    targets = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    seqs = [list(ex.prompt_ids) + t + [tokenizer.eos_token_id] for ex, t in zip(examples, targets)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)  # (B, L)
    labels = torch.full((len(seqs), width), -100)  # (B, L)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L)
    for i, (ex, s) in enumerate(zip(examples, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(ex.prompt_ids) : len(s)] = torch.tensor(s[len(ex.prompt_ids) :])
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 10 % of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_warmup(
    model: Any,
    tokenizer: Any,
    model_cfg: Any,
    data_cfg: Any,
    progress: Progress | None = None,
    stop: Callable[[int], bool] | None = None,
) -> list[float]:
    """Supervised training on `target` responses of the "warmup" split (a `direct_fraction`
    of them the direct answer, see `direct_fraction`; loss on response
    tokens only, AdamW, grad-norm clip 1.0, cosine schedule over model.warmup.steps); returns
    the loss per step. `stop(step)`, called after every step, may end it early."""
    w = model_cfg.warmup
    stream = SyntheticStream(
        data_cfg.task,
        data_cfg.difficulty,
        w.seed,
        tokenizer,
        "warmup",
        apply_chat_template=False,
        direct_fraction=direct_fraction(w, data_cfg.task),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, w.steps))
    model.train()
    losses = []
    for step in range(1, w.steps + 1):
        batch = _supervised_batch(stream.next_batch(w.batch_size), tokenizer)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = stop is not None and stop(step)
        if progress is not None:
            # stopped at the target: the bar ends full at the steps that ran (25/25, not 40/40)
            progress(step, step if done else w.steps)
        if done:
            break
        model.train()
    model.eval()
    return losses


def target_accuracy(warmup_cfg: Any) -> float | None:
    """The held-out greedy accuracy at which the warm-up stops (None: run all steps)."""
    return getattr(warmup_cfg, "target_acc", WARMUP_TARGET_ACC)


@torch.no_grad()
def _sample_correct(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_new_tokens: int,
    n: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> list[list[bool]]:
    """Correctness of n responses per example ([len(examples)][n]), generated with HF generate
    (greedy, or pure sampling at `temperature`: top_k=0, top_p=1). Private: a calibration and
    warmup.json helper, not the rollout engine."""
    model.eval()
    per_call = max(1, batch_size // n)
    out: list[list[bool]] = []
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        width = max(len(ex.prompt_ids) for ex in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)  # (b, P) left-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ex in enumerate(chunk):
            ids[i, width - len(ex.prompt_ids) :] = torch.tensor(ex.prompt_ids)
            mask[i, width - len(ex.prompt_ids) :] = 1
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(kwargs if do_sample else {"do_sample": False}),
        )  # (b * n, P + R), a prompt's samples adjacent
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for i, ex in enumerate(chunk):
            out.append([verify(ex.verifier, t, ex.answer) for t in texts[i * n : (i + 1) * n]])
    return out


def _greedy_accuracy(
    model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int | None = None
) -> float:
    """Fraction of examples answered correctly by greedy decoding."""
    if max_new_tokens is None:
        longest = max(
            len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples
        )
        max_new_tokens = longest + 4
    rows = _sample_correct(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    return sum(r[0] for r in rows) / len(rows)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `path` (created if needed), released on exit."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warmup_policy(model_cfg: Any, data_cfg: Any, progress: Progress | None = None) -> Path:
    """Build (or reuse) the warmed-up tiny policy; returns its HF directory.

    Cached at `<model.cache_dir>/warmup-<hash>/` keyed by (model.tiny, model.warmup, data.task,
    data.difficulty, the target accuracy, the resolved direct fraction when > 0,
    WARMUP_VERSION). Built in a temporary directory and renamed into place under an fcntl lock,
    so parallel workers build it once and never see a partial directory. Deterministic:
    torch.manual_seed(model.warmup.seed) inside a forked RNG (the caller's RNG state is
    unchanged, built or cached); float reduction order may still differ across hardware, not
    across the caller's thread count (WARMUP_THREADS).
    """
    if data_cfg.source != "synthetic":
        raise HapoError(
            "model.init='warmup' needs data.source='synthetic' (the warm-up trains on the "
            "synthetic task's reference responses); use model.init='pretrained' for files"
        )
    cache = Path(model_cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"warmup-{warmup_key(model_cfg, data_cfg)}"
    if not (final / "warmup.json").is_file():
        with _file_lock(cache / f"{final.name}.lock"):
            if not (final / "warmup.json").is_file():
                quiet_transformers()
                with torch.random.fork_rng(devices=[]), num_threads(WARMUP_THREADS):
                    _build_warmup(model_cfg, data_cfg, final, progress)  # caller's RNG kept
    line = warmup_shortfall(final)
    if line is not None and os.environ.get("RANK", "0") == "0":  # once per launch, not per rank
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False,
                                   soft_wrap=True)
    return final


def warmup_shortfall(policy_dir: Path) -> str | None:
    """One line when the warm-up policy in `policy_dir` stopped at its step cap before its
    probe accuracy reached `model.warmup.target_acc` (None when it did, or had no target).

    Warned about, not refused, every time the policy is used, built or cached: the target is
    where a warm-up aims, `model.warmup.steps` only caps it, and short warm-ups are
    deliberate in CPU tests and demos. What must not happen is that an RL run starts from a
    policy that answers nothing, and so may get no reward signal, without a word."""
    try:
        info = json.loads((Path(policy_dir) / "warmup.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    target, probe = info.get("target_acc"), info.get("probe_acc")
    if not isinstance(target, (int, float)) or (isinstance(probe, (int, float)) and probe >= target):
        return None
    acc = info.get("heldout_greedy_acc")
    shown = f"{acc:.3f}" if isinstance(acc, (int, float)) else "unknown"
    cap = (info.get("warmup") or {}).get("steps")
    return (
        f"the warm-up policy missed model.warmup.target_acc={target}: held-out greedy accuracy "
        f"{shown} after {info.get('steps_run')} steps (model.warmup.steps={cap} is the cap; "
        f"{policy_dir}); raise model.warmup.steps, or RL may see no reward"
    )


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside, restored after (None: left as it is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_warmup(model_cfg: Any, data_cfg: Any, final: Path, progress: Progress | None) -> None:
    """Train, evaluate and save the warm-up policy into `final` (see `warmup_policy`)."""
    cache = final.parent
    t0 = time.perf_counter()
    torch.manual_seed(model_cfg.warmup.seed)
    tokenizer = build_tokenizer()
    model = build_tiny_model(model_cfg.tiny, tokenizer)
    target = target_accuracy(model_cfg.warmup)
    stop: Callable[[int], bool] | None = None
    stop_at: list[tuple[int, float]] = []  # (step, held-out accuracy) of each probe
    if target is not None:
        probe = heldout_examples(
            data_cfg.task,
            data_cfg.difficulty,
            WARMUP_STOP_SIZE,
            tokenizer,
            apply_chat_template=False,
            seed=HELDOUT_SEED + 1,
        )

        def target_reached(step: int) -> bool:
            # probe every WARMUP_CHECK_EVERY steps, every 5 once a third of the way there
            near = bool(stop_at) and stop_at[-1][1] >= target / 3
            every = 5 if near else WARMUP_CHECK_EVERY
            if step - (stop_at[-1][0] if stop_at else 0) < every:
                return False
            stop_at.append((step, _greedy_accuracy(model, tokenizer, probe)))
            return stop_at[-1][1] >= target

        stop = target_reached

    losses = train_warmup(model, tokenizer, model_cfg, data_cfg, progress, stop)
    train_s = time.perf_counter() - t0
    heldout = heldout_examples(
        data_cfg.task,
        data_cfg.difficulty,
        WARMUP_EVAL_SIZE,
        tokenizer,
        apply_chat_template=False,
    )
    acc = _greedy_accuracy(model, tokenizer, heldout)
    info = {
        "key": final.name.removeprefix("warmup-"),
        "version": WARMUP_VERSION,
        "task": data_cfg.task,
        "difficulty": data_cfg.difficulty,
        "direct_fraction": direct_fraction(model_cfg.warmup, data_cfg.task),
        "tiny": model_cfg.tiny.model_dump(mode="json"),
        "warmup": model_cfg.warmup.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_run": len(losses),
        "target_acc": target,
        "probe_acc": stop_at[-1][1] if stop_at else None,
        "final_loss": losses[-1] if losses else None,
        "heldout_greedy_acc": acc,
        "heldout_size": len(heldout),
        "train_seconds": round(train_s, 2),
        "torch_threads": torch.get_num_threads(),
    }
    tmp = cache / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmup.json").write_text(json.dumps(info, indent=2) + "\n")  # written last
        if final.exists():  # a leftover without warmup.json (never a finished build): replace
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: readers see no directory or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# resolving and loading
# ---------------------------------------------------------------------------------------------


def resolve_policy_path(model_cfg: Any, data_cfg: Any, progress: Progress | None = None) -> Path:
    """init=warmup: the cached warm-up directory (built if needed). init=pretrained: the local
    directory `model.path`, which must hold a config.json (never fetched from a hub)."""
    if model_cfg.init == "warmup":
        return warmup_policy(model_cfg, data_cfg, progress)
    if not model_cfg.path:
        raise ModelError("model.path is required when model.init='pretrained'")
    path = Path(model_cfg.path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model.path={model_cfg.path}: not a local directory (hubs are not used)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path={model_cfg.path}: no config.json (not an HF model directory)")
    return path
