"""Evaluation: avg@k, unbiased pass@k, maj@k, response length, truncation and critical tokens,
over fixed temperatures and adaptive temperature. `hapo train` reuses it for validation."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from analysis import schema

from .errors import HapoError
from .eval_request import EvalRequest, resolve_request

# ---------------------------------------------------------------------------------------------
# metrics (pure)
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples with c correct."""
    if k < 1 or n < k:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be in [0, n={n}]")
    if n - c < k:
        return 1.0
    # product form avoids huge binomials: prod_{i=n-c+1}^{n} (1 - k/i)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: list[bool]) -> float:
    """Mean accuracy over the k samples of one prompt."""
    if not correct:
        raise ValueError("avg@k of zero samples")
    return sum(bool(c) for c in correct) / len(correct)


def maj_at_k(answers: list[str | None], correct: list[bool]) -> float:
    """1.0 when the most frequent extracted answer (first seen wins ties; None never votes) is
    correct, else 0.0."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers vs {len(correct)} correctness flags")
    votes = Counter(a for a in answers if a)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == best)
    return float(any(c for a, c in zip(answers, correct) if a == winner))


def pass_ks(n: int) -> list[int]:
    """k values reported for n samples: 1, 2, 4, ... up to n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


# ---------------------------------------------------------------------------------------------
# sampling a benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class Setting:
    label: str
    temperature: float | None  # None = greedy
    adaptive: bool = False

    @staticmethod
    def parse(spec: str, greedy: bool) -> list[Setting]:
        out: list[Setting] = []
        for raw in spec.split(","):
            s = raw.strip().lower()
            if not s:
                continue
            if s == "adaptive" or s.startswith("adaptive@"):
                # base temperature T of T_t = T (1 + tau h): 'adaptive@0.5', or the caller's
                # default (the run's eval.temperature; 1.0 without a run)
                base = s.partition("@")[2]
                try:
                    t = float(base) if base else None
                except ValueError:
                    raise HapoError(f"--temperature {spec!r}: {raw!r}: expected adaptive@T") from None
                if t is not None and t <= 0:
                    raise HapoError(f"--temperature {spec!r}: temperatures must be > 0")
                out.append(Setting(s, t, adaptive=True))
                continue
            try:
                t = float(s)
            except ValueError:
                raise HapoError(
                    f"--temperature {spec!r}: {raw!r} is not a number or 'adaptive'"
                ) from None
            if not math.isfinite(t) or t <= 0:
                raise HapoError(
                    f"--temperature {spec!r}: temperatures must be finite and > 0 (use --greedy)"
                )
            out.append(Setting(f"T={t:g}", t))
        if greedy:
            out.append(Setting("greedy", None))
        if not out:
            raise HapoError("--temperature: no setting given")
        return out


def sample_benchmark(
    engine, tokenizer, examples, *, n, temperature, top_p, top_k, max_new_tokens, greedy,
    adaptive, tau, stats, seed, batch_size, progress=None, task=None, offset=0, scorer=None,
    rewards=None,
) -> list[dict[str, Any]]:
    """Generate n samples per prompt and score them: one record per prompt. Sample j of
    prompt i depends on (seed, offset + i, j) only, not on batching.

    Engines that record no decode-time entropy or T_t (vLLM) get both from `scorer`, the HF
    model, as training does; without a scorer their records hold `entropies=None` and
    `temperature_mean=None` (never NaN). `rewards` (a `RewardSet`, the run's data.rewards):
    `correct` is its accuracy and `rewards` its total per response."""
    from .rewards import extract_answer, verify
    from .rollout import SamplingSpec

    spec = SamplingSpec(
        n=1 if greedy else n, temperature=temperature or 1.0, top_p=1.0 if greedy else top_p,
        top_k=0 if greedy else top_k, max_new_tokens=max_new_tokens, greedy=greedy,
        adaptive=adaptive, tau=tau,
    )
    per_call = max(1, batch_size // spec.n)
    records: list[dict[str, Any]] = []
    for c0 in range(0, len(examples), per_call):
        chunk = examples[c0 : c0 + per_call]
        prompt_ids = [list(e.prompt_ids) for e in chunk]
        used_stats = stats if adaptive else None
        out = engine.generate(prompt_ids, spec, used_stats, seed=seed, prompt_offset=offset + c0)
        if not out.decode_stats and scorer is not None:
            out = _with_scorer_stats(out, scorer, prompt_ids, spec, used_stats)
        mask = out.response_mask.bool()
        texts = out.decode(tokenizer)
        by_prompt: dict[int, list[int]] = {}
        for row, p in enumerate(out.prompt_index.tolist()):
            by_prompt.setdefault(p, []).append(row)
        for p, rows in sorted(by_prompt.items()):
            ex = chunk[p]
            if rewards is None:
                correct = [bool(verify(ex.verifier, texts[i], ex.answer)) for i in rows]
            else:
                got = rewards.score([ex] * len(rows), [texts[i] for i in rows])
                correct, totals = [bool(a > 0) for a in got.acc.tolist()], got.total.tolist()
            ents = [out.entropy[i][mask[i]].float() for i in rows] if out.decode_stats else None
            records.append({
                "uid": ex.uid, "prompt": ex.prompt, "answer": ex.answer,
                "responses": [texts[i] for i in rows], "correct": correct,
                "answers": [extract_answer(ex.verifier, texts[i]) for i in rows],
                **({"rewards": totals} if rewards is not None else {}),
                "lengths": [int(mask[i].sum()) for i in rows],
                "truncated": [out.finish_reason[i] == "length" for i in rows],
                "entropies": ents,
                "temperature_mean": [float(out.temperature[i][mask[i]].mean())
                                     if mask[i].any() and out.decode_stats else None
                                     for i in rows],
            })
        if progress is not None and task is not None:
            progress.update(task, advance=len(chunk))
    return records


def _rewards_of(data_cfg, incorrect_score: float = 0.0):
    """The process's RewardSet of `data.rewards` (None without: each row's own grader)."""
    if not data_cfg.rewards:
        return None
    from .rewards.custom import reward_set

    return reward_set(data_cfg, incorrect_score)


def _with_scorer_stats(out, scorer, prompt_ids, spec, stats):
    """A vLLM batch with the HF model's untempered entropies and the T_t they imply."""
    from .learner.forward import rollout_entropy

    ent = rollout_entropy(scorer, prompt_ids, out, out.pad_token_id)
    return out.with_decode_stats(ent, spec.temperature, spec.tau, stats,
                                 adaptive=spec.uses_adaptive_temperature)


def summarize(records, n: int, critical_threshold: float | None) -> dict[str, Any]:
    """Benchmark metrics from per-prompt records."""
    if not records:
        raise HapoError("benchmark has no prompts")
    k = len(records[0]["correct"])
    out: dict[str, Any] = {"n": k, f"avg@{k}": sum(avg_at_k(r["correct"]) for r in records)
                           / len(records)}
    for kk in pass_ks(k):
        out[f"pass@{kk}"] = sum(pass_at_k(k, sum(r["correct"]), kk) for r in records) / len(records)
    out[f"maj@{k}"] = sum(maj_at_k(r["answers"], r["correct"]) for r in records) / len(records)
    lengths = [x for r in records for x in r["lengths"]]
    out["response_len_mean"] = sum(lengths) / len(lengths)
    trunc = [x for r in records for x in r["truncated"]]
    out["truncation_rate"] = sum(trunc) / len(trunc)
    if critical_threshold is not None:
        if any(r["entropies"] is None for r in records):
            raise RuntimeError("critical tokens need entropies: pass sample_benchmark a scorer")
        if not math.isfinite(critical_threshold):
            raise RuntimeError(f"critical entropy threshold is {critical_threshold}")
        counts = [int((e >= critical_threshold).sum()) for r in records for e in r["entropies"]]
        out["critical_tokens_mean"] = sum(counts) / len(counts)
        out["critical_entropy_threshold"] = critical_threshold
    if "rewards" in records[0]:  # data.rewards: the mean total reward per response
        totals = [x for r in records for x in r["rewards"]]
        out["reward_mean"] = sum(totals) / len(totals)
    temps = [t for r in records for t in r["temperature_mean"] if t is not None]
    out["temperature_mean"] = sum(temps) / len(temps) if temps else None
    return out


# ---------------------------------------------------------------------------------------------
# validation inside `hapo train`
# ---------------------------------------------------------------------------------------------


def _gather_records(records: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return records
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def validation_metrics(engine, tokenizer, val_sets, recipe, step: int, rank: int = 0,
                       world: int = 1) -> dict[str, float]:
    """val/<bench>/avg@k (eval.temperature, eval.top_p) and val/<bench>/greedy. Each rank
    samples a contiguous shard of the prompts (with their global indices, so the samples are
    the same for any number of ranks); the records are gathered before scoring."""
    ev = recipe.eval
    max_new = ev.max_new_tokens or recipe.rollout.max_new_tokens
    out: dict[str, float] = {}
    for bench, examples in val_sets.items():
        examples = examples[: ev.limit] if ev.limit else examples
        per = -(-len(examples) // world)
        lo, hi = min(rank * per, len(examples)), min((rank + 1) * per, len(examples))
        common: dict[str, Any] = dict(
            top_p=ev.top_p, top_k=0, max_new_tokens=max_new, adaptive=False, tau=0.0, stats=None,
            batch_size=recipe.rollout.batch_size, offset=lo,
            rewards=_rewards_of(recipe.data, recipe.train.incorrect_score))
        mine = examples[lo:hi]
        recs = sample_benchmark(engine, tokenizer, mine, n=ev.n, temperature=ev.temperature,
                                greedy=False, seed=1_000_000 + step, **common)
        s = summarize(_gather_records(recs, world), ev.n, None)
        out[schema.val_metric(bench, ev.n)] = s[f"avg@{ev.n}"]
        if ev.greedy:
            recs = sample_benchmark(engine, tokenizer, mine, n=1, temperature=None,
                                    greedy=True, seed=0, **common)
            out[schema.val_greedy_metric(bench)] = summarize(_gather_records(recs, world), 1,
                                                             None)["avg@1"]
    return out


# ---------------------------------------------------------------------------------------------
# `hapo evaluate`
# ---------------------------------------------------------------------------------------------


def result_table(rows: list[dict[str, Any]], n: int):
    """The summary table, every value readable at 80 columns: no box, one space between
    columns, numbers never cut; a long benchmark or setting name wraps instead of `dapo_…`.
    The jsonl holds every field."""
    from rich.table import Table

    table = Table(box=None, padding=(0, 1, 0, 0), header_style="bold")
    table.add_column("bench", overflow="fold", max_width=18)
    table.add_column("ckpt", justify="right", no_wrap=True)
    table.add_column("setting", overflow="fold", max_width=14)
    for header in (f"avg@{n}", "pass@1", f"pass@{n}", f"maj@{n}", "len", "trunc", "crit"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        k = r["n"]
        crit = r.get("critical_tokens_mean")
        table.add_row(r["benchmark"], str(r["checkpoint_step"]), r["setting"],
                      f"{r[f'avg@{k}']:.3f}", f"{r['pass@1']:.3f}",
                      f"{r[f'pass@{k}']:.3f}", f"{r[f'maj@{k}']:.3f}",
                      f"{r['response_len_mean']:.1f}", f"{r['truncation_rate']:.2f}",
                      "-" if crit is None else f"{crit:.2f}")
    return table


def _load_checkpoint(model_dir, res):
    """(model, tokenizer, the run's entropy stats or None) of one model directory; None when
    it vanished meanwhile (a live run's rotation: `eval_request.vanished`)."""
    from .algo import EntropyStats
    from .eval_request import vanished
    from .export import load_checkpoint_model
    from .learner.checkpoint import STATE_FILE

    try:  # a DCP checkpoint through its shards, an HF folder as it is
        model, tok = load_checkpoint_model(model_dir, "float32", res.trust_remote_code)
        state_file = model_dir / STATE_FILE
        st = json.loads(state_file.read_text()).get("entropy_stats") if state_file.exists() \
            else None
    except Exception:
        if res.run_dir is not None and vanished(model_dir, res.live):
            return None
        raise
    return model, tok, (EntropyStats.from_dict(st) if st else None)


def server_dir(out_dir, name: str):
    """Where `--engine vllm-server`'s local servers log (server-K.log) and record their process
    groups (a later evaluation of that name stops a leftover); removed when the evaluation ends
    without error."""
    return out_dir / f".{name}-servers"


def _sample_models(req: EvalRequest, res, settings, console,
                   skipped: list[str]) -> tuple[list, list]:
    """(result rows, sample rows) of every checkpoint x benchmark x setting; a checkpoint that
    vanishes before it is loaded is left out with a line in `skipped`. What the engine started
    (`--engine vllm-server`'s local servers) stops on return, on an error and on Ctrl-C."""
    with ExitStack() as owned:
        return _sample_each(req, res, settings, console, skipped, owned)


def _sample_each(req: EvalRequest, res, settings, console, skipped: list[str],
                 owned: ExitStack) -> tuple[list, list]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .algo import entropy_stats, quantile_1d
    from .data import load_benchmark
    from .eval_request import vanished_line
    from .rollout.factory import build_engine

    n, tau, seed, max_new = req.n, res.tau, req.seed, res.max_new
    data_cfg, models, benchmarks = res.data, res.models, res.benchmarks

    # One critical-entropy threshold per benchmark for the whole evaluation: the 80th percentile
    # of token entropy of the first (reference) model listed, at T = 1, so counts compare
    # across checkpoints (a per-checkpoint percentile would give ~0.2 x length by construction).
    thresholds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    eng = None
    for step, model_dir in models:
        loaded = _load_checkpoint(model_dir, res)
        if loaded is None:
            skipped.append(vanished_line(model_dir, "checked"))
            if console is not None:
                console.print(f"[yellow]skipped[/yellow] {skipped[-1]}", highlight=False,
                              soft_wrap=True)
            continue
        model, tok, run_stats = loaded
        model.eval()
        if eng is None:
            from .export import engine_folder
            from .rollout.factory import samples_with_learner_module

            path = model_dir if samples_with_learner_module(res.rollout.engine) else \
                engine_folder(model_dir)  # vLLM loads a save_pretrained folder
            eng = build_engine(res.rollout, model, tok, str(path), None,
                               max_prompt_length=data_cfg.max_prompt_length,
                               max_new_tokens=max_new, dtype="float32", seed=seed,
                               trust_remote_code=res.trust_remote_code,
                               run_dir=server_dir(res.out_dir, req.name))
            owned.callback(eng.close)  # vllm-server: pushes `model` before its first batch
        else:  # one engine per process (vLLM: one per process at most): later checkpoints
            eng.sync_weights(model)  # go in by weight sync
        for bench in benchmarks:
            bench_name, examples = load_benchmark(bench, data_cfg, tok, limit=req.limit)
            rewards = _rewards_of(data_cfg)
            if rewards is not None:  # the run's data.rewards, checked on this benchmark's row
                rewards.probe(examples[0])
            common: dict[str, Any] = dict(
                top_p=req.top_p, top_k=req.top_k, max_new_tokens=max_new, tau=tau,
                batch_size=req.batch_size, scorer=model, rewards=rewards)
            # calibration pass at T = 1: the critical-entropy threshold and, if needed, the stats
            cal = sample_benchmark(eng, tok, examples, n=1, temperature=1.0, greedy=False,
                                   adaptive=False, stats=None, seed=seed + 7, **{**common,
                                   "top_p": 1.0, "top_k": 0})
            ents = torch.cat([e for r in cal for e in r["entropies"]])
            threshold = req.critical_entropy
            if threshold is None:
                threshold = thresholds.setdefault(
                    bench_name, quantile_1d(ents, res.critical_quantile, "paper"))
            stats = run_stats
            if stats is None and any(s.adaptive for s in settings):
                stats = entropy_stats(ents[None, :], torch.ones(1, ents.numel(), dtype=torch.bool))
            with Progress(TextColumn(f"[bold]{bench_name}[/bold] {{task.description}}"),
                          BarColumn(), MofNCompleteColumn(), console=console,
                          disable=console is None) as progress:
                for s in settings:
                    task = progress.add_task(s.label, total=len(examples))
                    recs = sample_benchmark(
                        eng, tok, examples, n=n,
                        temperature=s.temperature or (res.adaptive_base if s.adaptive else 1.0),
                        greedy=s.label == "greedy", adaptive=s.adaptive, stats=stats,
                        seed=seed, progress=progress, task=task, **common,
                    )
                    summ = summarize(recs, n, threshold)
                    rows.append({
                        "benchmark": bench_name, "setting": s.label,
                        "temperature": s.temperature, "adaptive": s.adaptive, "tau": tau
                        if s.adaptive else None, "checkpoint_step": step, "model": str(model_dir),
                        "top_p": req.top_p, "top_k": req.top_k, "max_new_tokens": max_new,
                        "limit": req.limit, "engine": req.engine, "sampling_seed": seed, **summ,
                    })
                    for r in recs:
                        ent = [float(e.mean()) if e.numel() else None for e in r["entropies"]]
                        samples.append({
                            "benchmark": bench_name, "setting": s.label, "checkpoint_step": step,
                            "uid": r["uid"], "prompt": r["prompt"], "answer": r["answer"],
                            "responses": r["responses"], "correct": r["correct"],
                            **({"rewards": r["rewards"]} if "rewards" in r else {}),
                            "lengths": r["lengths"], "entropy_mean": ent,
                            "critical_tokens": [int((e >= threshold).sum())
                                                for e in r["entropies"]],
                        })
    return rows, samples


def run_evaluate(req: EvalRequest, console=None) -> list[dict[str, Any]]:
    """Sample, score and write `<out>/<name>.jsonl` and `<name>-samples.jsonl`. Earlier files
    of that name are refused before sampling (`--overwrite` replaces them); if they appear
    while sampling (another evaluation), the rows go under the next free name instead."""
    from .eval_request import write_results
    from .models import num_threads

    settings = Setting.parse(req.temperatures, req.greedy)
    res = resolve_request(req)
    skipped = list(res.skipped)
    if console is not None:
        for line in skipped:
            console.print(f"[yellow]skipped[/yellow] {line}", highlight=False, soft_wrap=True)
    try:
        with num_threads(req.threads):  # --threads: for this evaluation only
            rows, samples = _sample_models(req, res, settings, console, skipped)
        shutil.rmtree(server_dir(res.out_dir, req.name), ignore_errors=True)  # logs of a success
    except KeyboardInterrupt:
        where = res.out_dir / f"{req.name}.jsonl"
        raise EvalInterrupted(f"interrupted; nothing was written to {where} (an evaluation "
                              "does not resume): run the same command again to start it over"
                              ) from None
    if not rows:
        raise HapoError(f"{req.target}: every checkpoint was removed while it loaded (the live "
                        "run rotates them faster); copy one out of checkpoints/ and evaluate "
                        "the copy, or raise log.keep_checkpoints")
    main = write_results(res.out_dir, req.name, rows, samples, req.overwrite, console)
    if console is not None:
        table = result_table(rows, req.n)
        console.print(table)
        console.print(f"wrote {main}", highlight=False, soft_wrap=True)
    return rows


class EvalInterrupted(HapoError):
    """Ctrl-C or SIGTERM during sampling: one line, exit 130."""

    exit_code = 130
