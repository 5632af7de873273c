"""What `hapo evaluate` was asked (`EvalRequest`), checked and completed from the run's
recipe: tau, response length, the critical-token quantile, benchmarks, data and vLLM settings
come from the run unless given. Also where its results go: an existing `<name>.jsonl` is never
replaced unasked, and checkpoints that a live run rotates away are skipped, not errors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from analysis import schema

from .errors import HapoError


def vllm_config(base: Any, options: list[str]) -> Any:
    """`base` (a VllmConfig) with `--vllm KEY=VALUE` options applied and validated."""
    from pydantic import ValidationError

    from .recipe import VllmConfig, apply_overrides

    for item in options:
        if "=" not in item:
            raise HapoError(f"--vllm {item!r}: expected KEY=VALUE, e.g. --vllm max_model_len=256")
    data = apply_overrides(base.model_dump(mode="json"), [o.strip() for o in options])
    try:
        return VllmConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(VllmConfig.model_fields)
            raise HapoError(f"--vllm: unknown option {loc!r} (known: {known})") from None
        msg = first["msg"].removeprefix("Value error, ")
        raise HapoError(f"--vllm {loc}={first.get('input')!r}: {msg}") from None



# --name becomes `<out>/<name>.jsonl`: a plain file name, never a path out of the folder
# (`../metrics` would replace the run's own metrics.jsonl).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# How long a failing checkpoint of a live run may take to vanish (the learner's rotation
# removes it with rmtree: its config.json can be gone a moment before the folder is).
VANISH_WAIT_S = 5.0


def check_options(*, n, tau, top_p, top_k, max_new_tokens, batch_size, limit, critical_entropy,
                  name, threads=None) -> None:
    """One HapoError (exit 2) for the first option out of range, naming it and the rule."""
    rules = [
        (n >= 1, f"--n {n}: must be >= 1"),
        (math.isfinite(tau) and tau >= 0, f"--tau {tau}: must be finite and >= 0"),
        (math.isfinite(top_p) and 0 < top_p <= 1, f"--top-p {top_p}: must be in (0, 1]"),
        (top_k >= 0, f"--top-k {top_k}: must be >= 0 (0 = off)"),
        (max_new_tokens is None or max_new_tokens >= 1,
         f"--max-new-tokens {max_new_tokens}: must be >= 1"),
        (batch_size >= 1, f"--batch-size {batch_size}: must be >= 1"),
        (limit is None or limit >= 1, f"--limit {limit}: must be >= 1"),
        (threads is None or threads >= 1, f"--threads {threads}: must be >= 1"),
        (critical_entropy is None or (math.isfinite(critical_entropy) and critical_entropy >= 0),
         f"--critical-entropy {critical_entropy}: must be finite and >= 0"),
        (bool(_NAME.fullmatch(name)) and name not in (".", ".."),
         f"--name {name!r}: must be a plain file name (letters, digits, . _ -), not a path"),
        (not name.endswith(schema.EVAL_SAMPLES_SUFFIX),
         f"--name {name!r}: must not end in {schema.EVAL_SAMPLES_SUFFIX!r} (that names the "
         "per-sample file of another evaluation)"),
    ]
    for ok, message in rules:
        if not ok:
            raise HapoError(message)


def _targets(target: str, checkpoints: str) -> tuple[Path | None, list[tuple[int | None, Path]]]:
    """(run_dir or None, [(checkpoint step or None, model dir)])."""
    from .learner.checkpoint import checkpoints_by_step

    p = Path(target)
    if not p.exists():
        raise HapoError(f"{target}: no such run directory or model directory")
    if (p / schema.MANIFEST).exists() or (p / schema.CHECKPOINTS_DIR).is_dir():
        by_step = checkpoints_by_step(p)
        if not by_step:
            raise HapoError(f"{target}: run directory has no checkpoint yet")
        if checkpoints == "latest":
            step = max(by_step)
            return p, [(step, by_step[step])]
        if checkpoints == "all":
            return p, sorted(by_step.items())
        try:
            steps = [int(s) for s in checkpoints.split(",") if s.strip()]
        except ValueError:
            raise HapoError(
                f"--checkpoints {checkpoints!r}: expected 'latest', 'all' or steps like 10,20"
            ) from None
        missing = [s for s in steps if s not in by_step]
        if missing:
            have = ", ".join(str(s) for s in sorted(by_step))
            raise HapoError(f"--checkpoints: step {missing[0]} not in {target} (have: {have})")
        return p, [(s, by_step[s]) for s in steps]
    if (p / "config.json").exists():
        return None, [(None, p)]
    raise HapoError(f"{target}: neither a run directory (manifest.json) nor a HF model (config.json)")


@dataclass(frozen=True)
class EvalRequest:
    """What `hapo evaluate` was asked; None fields default to the run's recipe (or, for a
    bare model directory, to the recipe defaults)."""

    target: str
    benchmarks: tuple[str, ...] = ()
    checkpoints: str = "latest"
    n: int = 8
    temperatures: str = "0.5"
    tau: float | None = None  # the run's algo.tau
    top_p: float = 0.7
    top_k: int = 0
    max_new_tokens: int | None = None  # the run's rollout.max_new_tokens
    greedy: bool = False
    engine: str = "hf"
    batch_size: int = 256
    seed: int = 0
    limit: int | None = None
    threads: int | None = None  # torch CPU threads (None: torch's default)
    critical_entropy: float | None = None  # the algo.critical_quantile entropy at T = 1
    out: Path | None = None
    name: str = "eval"
    overwrite: bool = False  # replace <out>/<name>.jsonl (and -samples) if they exist
    vllm_options: tuple[str, ...] = ()
    server_urls: tuple[str, ...] = ()  # --engine vllm-server: these servers (else the run's
    # rollout.server.urls, else local servers started for this evaluation)


@dataclass(frozen=True)
class _Resolved:
    """An EvalRequest with the run's recipe applied."""

    run_dir: Path | None
    models: list[tuple[int | None, Path]]
    benchmarks: list[str]
    data: Any  # DataConfig
    rollout: Any  # RolloutConfig of the engine
    tau: float
    max_new: int
    critical_quantile: float
    adaptive_base: float  # base T of 'adaptive' (the run's eval.temperature)
    out_dir: Path
    trust_remote_code: bool  # the run's model.trust_remote_code
    live: bool = False  # the run's manifest says `running`: its checkpoints may rotate away
    skipped: tuple[str, ...] = ()  # one line per checkpoint that vanished before it was read


def resolve_request(req: EvalRequest) -> _Resolved:
    """Validate the options (one line, exit 2) and fill the defaults from the run's recipe."""
    from .export import check_checkpoint_dir
    from .recipe import AlgoConfig, DataConfig, EvalConfig, RolloutConfig, load_recipe
    from .rollout.factory import engine_names

    check_options(n=req.n, tau=0.0 if req.tau is None else req.tau, top_p=req.top_p,
                  top_k=req.top_k, max_new_tokens=req.max_new_tokens, batch_size=req.batch_size,
                  limit=req.limit, critical_entropy=req.critical_entropy, name=req.name,
                  threads=req.threads)
    if req.engine not in engine_names():
        raise HapoError(f"--engine {req.engine!r}: use one of: {', '.join(engine_names())}")
    # 'latest' and 'all' mean what is there: when a live run rotated every listed checkpoint
    # away before it was checked (a slow first check), list again, a few times
    relist = req.checkpoints in ("latest", "all")
    skipped: list[str] = []
    run_dir: Path | None = None
    kept: list[tuple[int | None, Path]] = []
    for _attempt in range(3 if relist else 1):
        run_dir, models = _targets(req.target, req.checkpoints)
        live = run_dir is not None and schema.read_manifest(run_dir).get("status") == \
            schema.STATUS_RUNNING
        kept = []
        for step, model_dir in models:  # every checkpoint, before hours of sampling
            try:
                check_checkpoint_dir(model_dir)  # a DCP checkpoint or an HF folder
            except HapoError:
                if run_dir is None or not vanished(model_dir, live):
                    raise
                skipped.append(vanished_line(model_dir, "listed"))
                continue
            kept.append((step, model_dir))
        if kept:
            break
    if not kept:
        raise HapoError(f"{req.target}: every checkpoint asked for was removed before it was "
                        "read (a live run rotates them faster than they are checked)"
                        + ("" if relist else "; try --checkpoints latest"))
    models = kept
    has_recipe = run_dir is not None and (run_dir / schema.RECIPE).exists()
    # a bare model directory: the sections' defaults
    rec = (load_recipe(run_dir / schema.RECIPE) if run_dir is not None and has_recipe
           else SimpleNamespace(data=DataConfig(), rollout=RolloutConfig(), algo=AlgoConfig(),
                                eval=EvalConfig()))
    benchmarks = list(req.benchmarks)
    if not benchmarks and has_recipe:
        benchmarks = ([rec.data.task] if rec.data.source == "synthetic"
                      else list(rec.data.val_files))
    if not benchmarks:
        raise HapoError("no benchmark given: pass --bench NAME_OR_FILE")
    out_dir = Path(req.out) if req.out else (run_dir / schema.EVAL_DIR if run_dir else None)
    if out_dir is None:
        raise HapoError("--out DIR is required when evaluating a bare model directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise HapoError(f"--out {out_dir}: is a file; expected a directory")
    if not req.overwrite:
        refuse_existing(out_dir, req.name)
    if req.server_urls and req.engine != "vllm-server":
        raise HapoError(f"--server-url is for --engine vllm-server, not --engine {req.engine}")
    server = rec.rollout.server  # the run's transfer settings; --server-url replaces its urls
    if req.server_urls:
        bad = [u for u in req.server_urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise HapoError(f"--server-url {bad[0]!r}: expected http://HOST:PORT")
        server = server.model_copy(update={"urls": list(req.server_urls)})
    # req.engine is one of engine_names() (checked above) and pydantic checks it again
    rollout = RolloutConfig(engine=req.engine,  # pyright: ignore[reportArgumentType]
                            batch_size=req.batch_size,
                            vllm=vllm_config(rec.rollout.vllm, list(req.vllm_options)),
                            server=server)
    return _Resolved(
        run_dir, models, benchmarks, rec.data, rollout,
        tau=rec.algo.tau if req.tau is None else req.tau,
        max_new=req.max_new_tokens or rec.rollout.max_new_tokens,
        critical_quantile=rec.algo.critical_quantile,
        adaptive_base=rec.eval.temperature if has_recipe else 1.0, out_dir=out_dir,
        trust_remote_code=has_recipe and rec.model.trust_remote_code, live=live,
        skipped=tuple(skipped),
    )


# ---------------------------------------------------------------------------------------------
# earlier results are never replaced unasked
# ---------------------------------------------------------------------------------------------


def output_files(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(`<name>.jsonl`, `<name>-samples.jsonl`) in `out_dir`."""
    return (out_dir / f"{name}.jsonl",
            out_dir / f"{name}{schema.EVAL_SAMPLES_SUFFIX}.jsonl")


def free_name(out_dir: Path, name: str) -> str:
    """`name` if neither of its files exists in `out_dir`, else the first free `name-2`, ..."""
    candidate, k = name, 1
    while any(p.exists() for p in output_files(out_dir, candidate)):
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def refuse_existing(out_dir: Path, name: str) -> None:
    """One line (exit 2) when an earlier evaluation wrote `name` in `out_dir`: its file, its
    row count, and the two ways on (a free --name, or --overwrite)."""
    for path in output_files(out_dir, name):
        if path.exists():
            try:
                rows = sum(1 for line in path.read_text(errors="replace").splitlines()
                           if line.strip())
                what = f"{rows} row{'s' if rows != 1 else ''} from an earlier evaluation"
            except OSError as exc:
                what = f"unreadable: {exc.strerror or type(exc).__name__}"
            raise HapoError(
                f"{path}: exists ({what}); pass --name {free_name(out_dir, name)} to keep both, "
                "or --overwrite to replace it"
            )


def write_results(out_dir, name, rows, samples, overwrite, console) -> Any:
    """Write the rows and samples; returns the results file. Without `overwrite` the results
    file is created exclusively (a hard link of a finished temporary file), so another
    evaluation's file that appeared meanwhile is never replaced."""
    import json
    import os
    import tempfile

    from .runlog import atomic_write_text

    text = "".join(json.dumps(r) + "\n" for r in rows)
    sample_text = "".join(json.dumps(r) + "\n" for r in samples)
    main, side = output_files(out_dir, name)
    if overwrite:
        atomic_write_text(main, text)
        atomic_write_text(side, sample_text)
        return main
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        wanted = name
        while True:
            main, side = output_files(out_dir, name)
            try:
                if side.exists():
                    raise FileExistsError(side)
                _link_or_create(tmp, main, text)
                break
            except FileExistsError:
                name = free_name(out_dir, wanted)
        if name != wanted and console is not None:
            console.print(f"[yellow]note[/yellow] {out_dir / (wanted + '.jsonl')} appeared while "
                          f"sampling (another evaluation); these results are in {main}",
                          highlight=False, soft_wrap=True)
    finally:
        os.unlink(tmp)
    atomic_write_text(side, sample_text)
    return main


def _link_or_create(tmp, path, text: str) -> None:
    """`path` made from the finished `tmp` only if it does not exist (FileExistsError if it
    does): a hard link, or where the filesystem has none, an exclusive create."""
    import os

    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network filesystems)
        with open(path, "x") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------
# checkpoints that a live run rotates away
# ---------------------------------------------------------------------------------------------


def vanished(model_dir: Path, live: bool, wait_s: float = VANISH_WAIT_S) -> bool:
    """True when `model_dir` is gone, or (a live run) goes within `wait_s`: the learner's
    rotation removed it. A broken folder that stays is not vanished (its error stands)."""
    import time

    deadline = time.monotonic() + (wait_s if live else 0.0)
    while True:
        if not Path(model_dir).exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def vanished_line(model_dir: Path, when: str) -> str:
    """The note printed for a checkpoint skipped because it vanished."""
    return f"{Path(model_dir).name}: removed after it was {when} (the run rotates its checkpoints)"


