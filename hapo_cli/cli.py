"""`hapo`: train, evaluate, ablate and analyze token-aware RL runs (HAPO, DAPO, GRPO, forking).

Thin layer: parse, load the recipe, call the library, print with rich. User errors print one red
line on stderr and exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import HapoError
from .recipe import RecipeError, list_recipes, load_recipe, resolve_recipe_path
from .serve.command import serve_command

app = typer.Typer(
    name="hapo",
    help="Token-aware RL for LLMs with verifiable rewards: HAPO and its baselines.\n\n"
    "Example: hapo train --recipe tiny/hapo --components ABCD --max-steps 50",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List and print recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

console = Console()
err_console = Console(stderr=True)
_STATE = {"debug": False}

# Errors that are the user's: one line, exit 2. Data, model and run-directory errors are
# HapoError subclasses.
USER_ERRORS: tuple[type[BaseException], ...] = (
    RecipeError, HapoError, FileNotFoundError, typer.BadParameter,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    # escape: a message naming `hapo[wandb]` or a `[0.9, 0.999]` value is text, not markup
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run `fn`, turning user errors into one red line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        if _STATE["debug"]:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # whole line
        raise fail(msg, getattr(exc, "exit_code", 2)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; run the same command again to continue", 130) from None


SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe field: --set train.lr=1e-4 (repeatable)."),
]
ComponentsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--components", "-c", help="HAPO components to switch on: any of ABCD, or 'none' (baseline)."
    ),
]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Recipe name (see `hapo recipes list`) or YAML path.")
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _STATE["debug"] = debug


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


@recipes_app.command("list")
def recipes_list() -> None:
    """List the recipes shipped under recipes/.

    Example: hapo recipes list
    """
    from rich.table import Table

    table = Table("recipe", "components", "baseline", "model", "task / data")
    for name in list_recipes():
        try:
            r = load_recipe(name)
        except RecipeError as exc:
            table.add_row(name, "[red]invalid[/red]", str(exc), "", "")
            continue
        model = r.model.path if r.model.init == "pretrained" else "tiny (warm-up)"
        data = r.data.task if r.data.source == "synthetic" else ", ".join(r.data.train_files)
        table.add_row(name, r.components, r.algo.baseline, str(model), data)
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    set_: SetOpt = None,
    components: ComponentsOpt = None,
    prompt: Annotated[bool, typer.Option(
        "--prompt", help="Also print the first training prompt as the model gets it (chat "
        "template, data.system_prompt, prompt_template, chat_template_kwargs), as YAML comments.",
    )] = False,
) -> None:
    """Print the fully resolved recipe as YAML.

    Example: hapo recipes show tiny/hapo --components AB --set train.lr=1e-4
    """
    recipe = _guard(load_recipe, name, set_ or [], components)
    typer.echo(recipe.to_yaml(), nl=False)
    if prompt:
        from .data.preview import first_prompt

        text, n = _guard(first_prompt, recipe)
        typer.echo(f"# first training prompt, {n} tokens, decoded from its token ids:")
        typer.echo("\n".join(f"#   {line}" for line in text.split("\n")))


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


@app.command()
def train(
    recipe: RecipeOpt = "tiny/hapo",
    set_: SetOpt = None,
    components: ComponentsOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="RL seed (overrides recipe.seed).")] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Run directory (default results/<name>).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a different run already in --output.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Override train.max_steps.")] = None,
) -> None:
    """Train a policy with HAPO or a baseline and log a run directory.

    Example: hapo train --recipe tiny/hapo --seed 2 --output results/hapo-s2
    """
    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    rec = _guard(load_recipe, recipe, overrides, components, seed)
    from .interrupts import interrupt_once
    from .learner.trainer import train as run_train

    if resume:  # the run's manifest and checkpoints name its recipe, recipe.yaml or not
        from .learner.resume import check_resume_recipe
        from .learner.trainer import run_dir_of

        _guard(check_resume_recipe, run_dir_of(rec, output), rec)

    from .interrupts import exit_code

    # a second Ctrl-C or SIGTERM cannot cut the clean-up short; SIGTERM/USR1/USR2 (preemption,
    # a time limit) end after a checkpointed step with exit code 75, Ctrl-C with 130
    with interrupt_once():
        try:
            summary = _guard(run_train, rec, output_dir=output, resume=resume,
                             overwrite=overwrite)
        except typer.Exit as exc:  # interrupted before the first step: nothing to checkpoint
            raise typer.Exit(exit_code() if exc.exit_code == 130 else exc.exit_code) from None
        if summary is not None and summary.status == "interrupted":
            raise fail(summary.message if summary.is_main else "interrupted", exit_code())
    if summary is not None:
        if summary.is_main:
            console.print(summary.line())
        if summary.status != "done":
            raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


@app.command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A run directory or a local HF model directory.")],
    benchmarks: Annotated[
        Optional[list[str]],
        typer.Option("--bench", "-b", help="Benchmark: synthetic task name or parquet/jsonl path."),
    ] = None,
    checkpoints: Annotated[
        str, typer.Option(help="Run dirs: 'latest', 'all' or steps '10,20'.")
    ] = "latest",
    step: Annotated[
        Optional[int], typer.Option(help="Run dirs: the checkpoint of this step (same as "
                                    "--checkpoints N).")
    ] = None,
    n: Annotated[int, typer.Option(help="Samples per prompt (k of avg@k).")] = 8,
    temperature: Annotated[
        str, typer.Option(help="Comma list of temperatures; may include 'adaptive'.")
    ] = "0.5",
    tau: Annotated[
        Optional[float],
        typer.Option(help="Adaptive temperature scale (default: the run's algo.tau, else 0.05)."),
    ] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 0.7,
    top_k: Annotated[int, typer.Option(help="Top-k (0 = off).")] = 0,
    max_new_tokens: Annotated[
        Optional[int], typer.Option(help="Response length limit (default: the run's).")
    ] = None,
    greedy: Annotated[bool, typer.Option(help="Also evaluate greedy decoding.")] = False,
    engine: Annotated[str, typer.Option(
        help="Rollout engine: hf, vllm (colocated) or vllm-server (--server-url, else the "
        "run's rollout.server.urls, else local servers started and stopped here).")] = "hf",
    batch_size: Annotated[int, typer.Option(help="Sequences per generation batch.")] = 256,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Prompts per benchmark at most.")] = None,
    threads: Annotated[
        Optional[int],
        typer.Option(help="torch CPU threads (default: torch's, all cores); 1 beside another job."),
    ] = None,
    critical_entropy: Annotated[
        Optional[float],
        typer.Option(help="Entropy threshold for critical tokens (default: p80 at T=1)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output dir (bare model).")] = None,
    name: Annotated[
        str, typer.Option(help="Name of the output files: <out>/<name>.jsonl and "
                          "<name>-samples.jsonl (an existing name is refused).")
    ] = "eval",
    overwrite: Annotated[
        bool, typer.Option(help="Replace <name>.jsonl of an earlier evaluation.")
    ] = False,
    vllm: Annotated[
        Optional[list[str]],
        typer.Option("--vllm", help="vLLM option KEY=VALUE (rollout.vllm.*), e.g. "
                     "gpu_memory_utilization=0.3; default: the run's recipe."),
    ] = None,
    server_url: Annotated[
        Optional[list[str]],
        typer.Option("--server-url", help="--engine vllm-server: a `hapo serve` server's URL "
                     "(repeat for several); the checkpoint's weights are pushed to it first."),
    ] = None,
) -> None:
    """Evaluate avg@k / pass@k / maj@k and critical tokens over temperatures.

    Example: hapo evaluate results/demo --bench arith --n 8 --temperature 0.5,0.8,1.0,adaptive
    """
    from .evaluate import EvalRequest, run_evaluate  # torch: not for `hapo --help`
    if step is not None:
        if checkpoints != "latest":
            raise fail("--step and --checkpoints both name checkpoints; give one")
        checkpoints = str(step)
    request = EvalRequest(
        target=target, benchmarks=tuple(benchmarks or ()), checkpoints=checkpoints, n=n,
        temperatures=temperature, tau=tau, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, greedy=greedy, engine=engine, batch_size=batch_size,
        seed=seed, limit=limit, threads=threads, critical_entropy=critical_entropy, out=out,
        name=name, overwrite=overwrite, vllm_options=tuple(vllm or ()),
        server_urls=tuple(server_url or ()),
    )
    from .interrupts import interrupt_once

    with interrupt_once():  # SIGTERM as Ctrl-C: one line saying what was kept, exit 130
        rows = _guard(run_evaluate, request, console=console)
    if rows is None:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory (with checkpoints/).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the save_pretrained model.")],
    step: Annotated[
        Optional[int], typer.Option(help="The checkpoint's step (default: the newest).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Weights' dtype: float32 (the trained masters), bfloat16 or "
                          "float16.")
    ] = "float32",
) -> None:
    """Write a checkpoint (DCP shards or HF) as a Hugging Face save_pretrained folder.

    Example: hapo export results/demo --step 40 --dtype bfloat16 --out models/demo-40
    """
    from .export import export_checkpoint

    folder = _guard(export_checkpoint, run, out, step, dtype)
    console.print(f"exported {folder}")


app.command("serve")(serve_command)  # hapo_cli/serve/command.py: a vLLM server for vllm-server


# ---------------------------------------------------------------------------------------------
# ablate
# ---------------------------------------------------------------------------------------------


ablate_app = typer.Typer(help="Run HAPO's component ablation grid; `hapo ablate status DIR`.")
app.add_typer(ablate_app, name="ablate")


@ablate_app.callback(invoke_without_command=True)
def ablate(
    ctx: typer.Context,
    recipe: RecipeOpt = "tiny/hapo",
    components: Annotated[str, typer.Option(help="Letters to ablate.")] = "ABCD",
    grid: Annotated[
        str, typer.Option(help="paper | single | leave-one-out | all.")
    ] = "paper",
    variants: Annotated[
        Optional[str],
        typer.Option(help="Explicit variants: none,B,AB,ABCD,ABCD-released (overrides --grid)."),
    ] = None,
    baselines: Annotated[
        Optional[str],
        typer.Option(help="Comma list of baselines (dapo,grpo,gspo,...): every variant on each, "
                     "with the baseline's published settings; runs named <baseline>-<variant>."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma list of seeds.")] = "1",
    set_: SetOpt = None,
    compare_released: Annotated[
        bool, typer.Option(help="Add the full method with the released-code normalisation.")
    ] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Ablation directory.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Variants run in parallel.")] = 1,
    retry_failed: Annotated[bool, typer.Option(help="Rerun failed runs.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Override train.max_steps.")] = None,
    summary: Annotated[
        Optional[Path], typer.Option(help="Only print the summary of an ablation directory.")
    ] = None,
    launcher: Annotated[
        str, typer.Option(help="Where the runs go: local (subprocesses here), slurm "
                          "(submitit job array) or ray (Ray Jobs).")
    ] = "local",
    launcher_config: Annotated[
        Optional[Path], typer.Option(help="cluster.yaml: a slurm: and/or ray: section "
                                     "(partition, account, time, nodes, GPUs, setup, sbatch "
                                     "options; Ray address and resources).")
    ] = None,
    detach: Annotated[
        bool, typer.Option(help="Submit and return (slurm, ray); `hapo ablate status DIR` "
                           "shows the runs, the same command reconciles and resubmits.")
    ] = False,
    max_attempts: Annotated[
        Optional[int], typer.Option(help="Starts of one run at most (preempted, time limit, "
                                    "lost node) before it counts as failed; default 3 on a "
                                    "cluster.")
    ] = None,
) -> None:
    """Run HAPO's component ablation grid, resumable, with a summary table.

    On Slurm: hapo ablate --launcher slurm --launcher-config cluster.yaml --detach

    Example: hapo ablate --recipe tiny/hapo --grid paper --seeds 1,2,3 --workers 2

    Baselines (Table 1): hapo ablate --baselines dapo,grpo,gspo --variants none,AB,ABCD
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        from .ablate import run_ablation, show_summary
    except ImportError:
        raise fail("`hapo ablate` is not available yet in this build") from None
    if summary is not None:
        _guard(show_summary, summary, console=console)
        return
    from .interrupts import interrupt_once

    with interrupt_once():
        ok = _guard(
            run_ablation,
            recipe=recipe,
            components=components,
            grid=grid,
            variants=variants,
            baselines=baselines,
            seeds=seeds,
            overrides=list(set_ or []),
            compare_released=compare_released,
            output=output,
            workers=workers,
            retry_failed=retry_failed,
            max_steps=max_steps,
            console=console,
            launcher=launcher,
            launcher_config=launcher_config,
            detach=detach,
            max_attempts=max_attempts,
        )
    if not ok:
        raise typer.Exit(1)


@ablate_app.command("status")
def ablate_status(
    directory: Annotated[Path, typer.Argument(help="The ablation directory.")],
) -> None:
    """Each run's live state (queued / running / done / failed / interrupted), attempt and
    job id.

    Example: hapo ablate status results/tiny-hapo-ablation
    """
    from .ablate import show_status

    _guard(show_status, directory, console=console)


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------


@app.command()
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="Run or ablation directories.")],
    out: Annotated[Optional[Path], typer.Option(help="Output dir (default: <first>/analysis).")] = None,
    format: Annotated[str, typer.Option("--format", help="Figure formats: png,pdf.")] = "png,pdf",
    smooth: Annotated[Optional[float], typer.Option(min=0.0, max=0.999, help="EMA weight of per-step curves, 0 = raw, <1; raw drawn faintly behind (unset: analysis.report.DEFAULT_SMOOTH)")] = None,
) -> None:
    """Draw the paper's figures and a report from logged runs (no torch needed).

    Example: hapo analyze results/demo --format png --smooth 0.9
    """
    for p in paths:
        if not p.is_dir():
            raise fail(f"{p}: not a directory (expected a run or ablation directory)")
    if out is not None and out.exists() and not out.is_dir():
        raise fail(f"--out {out}: is a file; expected a directory for the figures and report")
    formats = [f.strip() for f in format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad:
        raise fail(f"--format {format!r}: unknown format {bad[0]!r}; use png, pdf or svg")
    try:
        from analysis.report import analyze as run_analyze
    except ImportError:
        raise fail("`hapo analyze` is not available yet in this build") from None
    try:
        result = _guard(run_analyze, list(paths), out, formats, smooth)
    except ValueError as exc:  # analysis reports unreadable inputs as ValueError (no torch deps)
        if _STATE["debug"]:
            raise
        raise fail(str(exc).splitlines()[0]) from None
    except OSError as exc:  # a read-only or full output folder
        if _STATE["debug"]:
            raise
        from .runlog import os_error_line

        raise fail(f"cannot write the analysis: {os_error_line(exc)}") from None
    for line in getattr(result, "skipped_lines", lambda: [])():
        console.print(f"[yellow]skipped[/yellow] {line}", highlight=False)
    from rich.markup import escape

    warnings = list(getattr(result, "warnings", []))  # one line each; all in the report too
    for line in warnings[:20]:
        err_console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False,
                          soft_wrap=True)
    if len(warnings) > 20:
        err_console.print(f"[yellow]warning:[/yellow] ... and {len(warnings) - 20} more (see "
                          "the report)", highlight=False)
    console.print(f"report: {getattr(result, 'report_md', out)}")


def main() -> None:  # console-script entry point
    from .interrupts import exit_after_interrupt

    exit_after_interrupt()
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)


__all__ = ["app", "main", "resolve_recipe_path"]


if __name__ == "__main__":
    main()
