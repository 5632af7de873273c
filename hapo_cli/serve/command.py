"""The `hapo serve` command (registered by `hapo_cli.cli`; kept here so the CLI module stays
thin): parse, run `hapo_cli.serve.serve`, errors as one red line with exit code 2."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import HapoError


def serve_command(
    model_or_run: Annotated[str, typer.Argument(
        help="A Hugging Face model folder (or hub id), or a hapo run directory (its newest "
        "checkpoint folder).")],
    port: Annotated[int, typer.Option(help="Port to listen on.")],
    host: Annotated[str, typer.Option(
        help="Address to bind. The server exposes vLLM's dev routes, which let any caller run "
        "worker methods: keep 127.0.0.1 or a private network.")] = "127.0.0.1",
    vllm: Annotated[Optional[list[str]], typer.Option(
        "--vllm", help="Extra vLLM server option KEY=VALUE (repeatable), e.g. "
        "--vllm tensor-parallel-size=2 --vllm gpu-memory-utilization=0.9.")] = None,
) -> None:
    """Start a vLLM server for `rollout.engine: vllm-server` and print its URL.

    Example: hapo serve results/demo --port 8000, then train with
    --set 'rollout.server.urls=["http://127.0.0.1:8000"]'
    """
    from rich.console import Console
    from rich.markup import escape

    from . import parse_extra, serve

    out, err = Console(), Console(stderr=True)
    try:
        code = serve(model_or_run, host, port, parse_extra(vllm or []),
                     say=lambda line: out.print(line, highlight=False, soft_wrap=True))
    except HapoError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc).splitlines()[0])}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
