"""The tiny job, hapo DAPO vs hapo HAPO vs TRL's GRPOTrainer, per generation batch
(the table in docs/results.md, "Speed").

Same cached warm-up policy and tokenizer (the project's own tiny Qwen2, no hub), same `arith`
prompts in the same order, 16 prompts x 8 responses, <= 32 new tokens, T = 1, no top-k/top-p, two
optimizer steps of 64 responses per generation batch, token-mean loss ("dapo" in TRL), clip 0.2,
no KL, fp32, HF generation, one thread. The project runs `hapo train` with dynamic sampling,
overlong shaping, validation, token rows and checkpoints off. Rounds alternate (dapo, hapo, trl)
so machine noise hits all three alike; each run's first steps are warm-up and not timed.

TRL is optional (`pip install -e '.[bench]'`): without it the TRL row is skipped with one line.

Run: .venv/bin/python bench/bench_trl.py [--rounds 3] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP_STEPS = 2  # generation batches run but not timed in every run
PROJECT_OVERRIDES = [
    "train.dynamic_sampling.enabled=false", "train.overlong.enabled=false",
    "eval.every=0", "eval.at_start=false", "log.checkpoint_every=0", "log.token_sample_every=0",
]


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds now. CPU time of the process (one compute thread on both sides) is
    what a step costs; wall time adds whatever else the machine runs meanwhile."""
    return time.perf_counter(), time.process_time()


def project_step_times(recipe: str, steps: int, root: Path,
                       lengths: list[float] | None = None) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each timed step of one `hapo train` run (one generation batch);
    `lengths` gets each timed step's mean response length (the work a step does depends on it)."""
    from analysis.schema import RESPONSE_LEN_MEAN
    from hapo_cli.learner.trainer import Loop, train
    from hapo_cli.recipe import load_recipe

    rec = load_recipe(recipe, [f"train.max_steps={steps + WARMUP_STEPS}", *PROJECT_OVERRIDES])
    out = root / recipe.replace("/", "-")
    times: list[tuple[float, float]] = []
    original = Loop.train_step

    def timed(self, step):
        w0, c0 = _clock()
        row = original(self, step)
        w1, c1 = _clock()
        times.append((w1 - w0, c1 - c0))
        if lengths is not None and len(times) > WARMUP_STEPS:
            lengths.append(float(row[RESPONSE_LEN_MEAN]))
        return row

    Loop.train_step = timed
    try:
        train(rec, output_dir=out, overwrite=True, progress=False)
    finally:
        Loop.train_step = original
    return times[WARMUP_STEPS:]


def trl_available() -> str | None:
    """None when TRL can be used, else the one line saying why not."""
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except ImportError as exc:
        return f"TRL row skipped: trl is not installed ({exc}); pip install -e '.[bench]'"
    return None


def trl_config(rec, root: Path, gens: int):
    """TRL's GRPOConfig for the job `rec` (tiny/dapo) runs: B = 16 x 8 per generation, two
    optimizer steps of 64, token-mean ("dapo") loss, no KL, fp32, HF generation, `gens`
    generation batches."""
    from trl import GRPOConfig

    r, t = rec.rollout, rec.train
    per_step = t.mini_batch_prompts * r.n  # 64 responses per optimizer step
    steps_per_gen = t.prompts_per_step // t.mini_batch_prompts  # 2
    return GRPOConfig(
        output_dir=str(root / "trl"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=rec.seed,
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_gen, num_generations=r.n, num_iterations=1,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=1.0, top_k=0,
        use_vllm=False, beta=0.0, epsilon=rec.algo.eps_low, epsilon_high=rec.algo.eps_high,
        loss_type="dapo", scale_rewards="group", learning_rate=t.lr,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip, lr_scheduler_type="constant",
        max_steps=gens * steps_per_gen, shuffle_dataset=False, dataloader_num_workers=0,
        log_completions=False,
    )


def _trl_setup(recipe: str, steps: int, root: Path):
    """(trainer, callback) for one TRL run of `steps + WARMUP_STEPS` generation batches."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from hapo_cli.learner.streams import build_streams
    from hapo_cli.models import load_policy, resolve_policy_path
    from hapo_cli.recipe import load_recipe
    from hapo_cli.rewards.verify import verify

    rec = load_recipe(recipe, [])
    t = rec.train
    torch.set_num_threads(t.threads or 1)
    model, tok = load_policy(resolve_policy_path(rec.model, rec.data), "float32")
    gens = steps + WARMUP_STEPS
    # the prompts `hapo train` sees at steps 1..gens (its primary stream, same seed), in order
    stream = build_streams(rec.data, tok, rec.seed)
    examples = [e for _ in range(gens) for e in stream.next_batch(t.prompts_per_step)]
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer, "verifier": e.verifier}
                              for e in examples])

    def accuracy(prompts, completions, answer, verifier, **_):
        return [float(verify(v, c, a)) for c, a, v in zip(completions, answer, verifier)]

    cfg = trl_config(rec, root, gens)
    steps_per_gen = cfg.steps_per_generation

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(_clock())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_gen == 0:  # a generation batch is done
                self.ends.append(_clock())

    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one dict of metrics per step on stdout
    return trainer, clock


def trl_step_times(recipe: str, steps: int, root: Path) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per generation batch (two optimizer steps) of one TRL run."""
    import warnings

    from hapo_cli.models import quiet_transformers

    quiet_transformers()
    with warnings.catch_warnings():  # transformers' gradient-checkpointing renames, per step
        warnings.simplefilter("ignore", FutureWarning)
        trainer, clock = _trl_setup(recipe, steps, root)
        trainer.train()
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(clock.ends, clock.ends[1:])]
    return gaps[WARMUP_STEPS:]


def measure(rounds: int = 3, steps: int = 16, with_trl: bool = True,
            lengths: dict[str, list[float]] | None = None) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) per generation batch of each side over alternating rounds; `lengths` gets the
    project sides' mean response length per timed step."""
    lengths = {} if lengths is None else lengths
    lengths.update({"hapo DAPO": [], "hapo HAPO": []})
    sides = {"hapo DAPO": lambda root: project_step_times("tiny/dapo", steps, root,
                                                          lengths["hapo DAPO"]),
             "hapo HAPO": lambda root: project_step_times("tiny/hapo", steps, root,
                                                          lengths["hapo HAPO"])}
    if with_trl:
        sides["TRL GRPOTrainer"] = lambda root: trl_step_times("tiny/dapo", steps, root)
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for name, fn in sides.items():
                times[name] += fn(Path(tmp) / f"round-{i}")
    return times


def main(rounds: int = 3, steps: int = 16) -> dict[str, float]:
    from rich.console import Console

    console = Console()
    skip = trl_available()
    if skip:
        console.print(skip)
    # the warm-up policy is built (or found in the cache) before anything is timed
    from hapo_cli.models import resolve_policy_path
    from hapo_cli.recipe import load_recipe

    rec = load_recipe("tiny/dapo", [])
    resolve_policy_path(rec.model, rec.data)
    lengths: dict[str, list[float]] = {}
    times = measure(rounds, steps, with_trl=skip is None, lengths=lengths)
    return report(times, rounds, steps, console, lengths)


def report(times: dict[str, list[tuple[float, float]]], rounds: int, steps: int,
           console=None, lengths: dict[str, list[float]] | None = None) -> dict[str, float]:
    """The table: medians of wall and CPU seconds per generation batch, ratios to hapo DAPO, and
    for the project's sides the mean response length: HAPO and DAPO follow different
    trajectories from the same policy, so part of a ratio can be longer responses, not cost."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    table = Table(title=f"tiny job per generation batch (16x8, <=32 tokens, 2 optimizer steps): "
                        f"{rounds} alternating rounds x {steps} timed steps, medians, seconds")
    lengths = lengths or {}
    for col in ("side", "CPU", "CPU / hapo DAPO", "wall", "wall / hapo DAPO", "mean length"):
        table.add_column(col)
    for k in times:
        mean_len = f"{statistics.fmean(lengths[k]):.1f}" if lengths.get(k) else "-"
        table.add_row(k, f"{cpu[k]:.3f}", f"{cpu[k] / cpu['hapo DAPO']:.2f}", f"{wall[k]:.3f}",
                      f"{wall[k] / wall['hapo DAPO']:.2f}", mean_len)
    console.print(table)
    out = {**{f"cpu {k}": v for k, v in cpu.items()}, **{f"wall {k}": v for k, v in wall.items()}}
    ratios = {"HAPO/DAPO": ("hapo HAPO", "hapo DAPO"), "TRL/DAPO": ("TRL GRPOTrainer", "hapo DAPO")}
    parts = []
    for name, (a, b) in ratios.items():
        if a in cpu:
            out[name] = cpu[a] / cpu[b]
            parts.append(f"{name} {cpu[a] / cpu[b]:.2f} (wall {wall[a] / wall[b]:.2f})")
    if lengths.get("hapo HAPO") and lengths.get("hapo DAPO"):
        rel = statistics.fmean(lengths["hapo HAPO"]) / statistics.fmean(lengths["hapo DAPO"])
        out["HAPO/DAPO length"] = rel
        parts.append(f"mean response length HAPO/DAPO {rel:.2f}")
    console.print("CPU-time ratios: " + "  ".join(parts))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    main(a.rounds, a.steps)
