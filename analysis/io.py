"""Read run and ablation directories into pandas.

Everything here reads files only (the format is in ``analysis.schema``); nothing imports
torch or training code. Partial runs are normal input: a run still writing, or killed
mid-line, is read up to its last complete record without complaint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis import schema
from analysis.seeds import split_labels

RUN_KEYS = ("run", "label", "seed")  # columns added by the stack_* helpers


@dataclass
class Run:
    """One run directory, loaded.

    ``name`` is unique within one analysis; ``label`` is what curves are coloured and
    aggregated by: runs sharing a label are seeds of one configuration.
    """

    path: Path
    name: str
    label: str
    seed: int | None
    status: str
    manifest: dict[str, Any]
    recipe: dict[str, Any]
    metrics: pd.DataFrame  # one row per step, sorted, "step" column
    tokens: pd.DataFrame  # sampled token rows (schema.TOKEN_COLUMNS); may be empty
    evals: pd.DataFrame  # eval rows with a "source" column (file stem); may be empty
    variant: str | None = None  # set for runs of an ablation
    ablation: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Ablation:
    """An ablation directory: its plan, the status of each planned run, the loaded runs."""

    path: Path
    name: str
    plan: pd.DataFrame  # variant, seed, run_dir, status, error
    runs: list[Run]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Collection:
    """Everything ``load_paths`` found: plain runs and ablation runs, in input order."""

    runs: list[Run]
    ablations: list[Ablation]
    warnings: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Distinct labels in first-seen order (the order colours are assigned in)."""
        return list(dict.fromkeys(r.label for r in self.runs))


# ---------------------------------------------------------------- single files
def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse a JSON-lines file up to its last complete record.

    A last line that does not parse (a writer killed mid-line, or still writing) is dropped
    silently. A bad line elsewhere is skipped and reported in the returned warnings, with
    its line number, so one corrupt record does not hide a whole run.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    # index of the last non-blank line: the only one allowed to be incomplete silently
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i != last:
                notes.append(f"{path}:{i + 1}: skipped a line that is not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            notes.append(f"{path}:{i + 1}: skipped a line that is not a JSON object")
            continue
        rows.append(obj)
    return rows, notes


def load_metrics(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """``metrics.jsonl`` -> one row per step, sorted by step.

    Rows logged twice for a step (a resumed run, or validation logged in its own row) merge:
    per column, the last non-missing value wins.
    """
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({schema.STEP: pd.Series(dtype="int64")}), []
    rows, notes = read_jsonl(path)
    kept = []
    for n, row in enumerate(rows):
        if not isinstance(row.get(schema.STEP), (int, float)) or isinstance(
            row.get(schema.STEP), bool
        ):
            notes.append(f"{path}: record {n + 1} has no integer 'step'; skipped")
            continue
        kept.append(row)
    if not kept:
        return pd.DataFrame({schema.STEP: pd.Series(dtype="int64")}), notes
    df = pd.DataFrame.from_records(kept)
    df[schema.STEP] = df[schema.STEP].astype("int64")
    for col in df.columns:
        if col != schema.STEP and df[col].dtype == object:
            converted = pd.to_numeric(df[col], errors="coerce")
            if converted.notna().sum() == df[col].notna().sum():
                df[col] = converted
    df = df.groupby(schema.STEP, sort=True).last().reset_index()
    num = df.select_dtypes("number").columns.drop(schema.STEP)
    df[num] = df[num].replace([np.inf, -np.inf], np.nan)  # a diverged step: no point, no crash
    return df, notes


def load_tokens(run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """All ``tokens/step-*.parquet`` of a run, concatenated; empty when there are none.

    A file that cannot be read (written while the run was killed) is skipped with a note.
    """
    folder = Path(run_dir) / schema.TOKENS_DIR
    files = sorted(folder.glob(schema.TOKENS_GLOB)) if folder.is_dir() else []
    frames, notes = [], []
    for f in files:
        try:
            frame = pd.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            notes.append(f"{f}: unreadable token file skipped ({type(e).__name__})")
            continue
        missing = [c for c in schema.TOKEN_COLUMNS if c not in frame.columns]
        if missing:  # another table under the name: merged, it would be NaN columns
            notes.append(f"{f}: not a token sample (no column {', '.join(missing[:3])}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}); "
                         "skipped")
            continue
        frames.append(frame)
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(schema.TOKEN_COLUMNS)), notes
    return pd.concat(frames, ignore_index=True), notes


def _flatten_eval_row(row: dict[str, Any]) -> dict[str, Any]:
    """``{"pass@k": {"1": .5, "4": .8}}`` -> ``{"pass@1": .5, "pass@4": .8}``."""
    out = dict(row)
    for key in ("pass@k", "maj@k"):
        val = out.get(key)
        if isinstance(val, dict):
            del out[key]
            prefix = key.split("@")[0]
            for k, v in val.items():
                out[f"{prefix}@{k}"] = v
    return out


def load_evals(run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """All ``eval/*.jsonl`` result rows of a run with a ``source`` column (the file stem);
    the per-prompt ``<name>-samples.jsonl`` files are not results and are left out."""
    folder = Path(run_dir) / schema.EVAL_DIR
    files = sorted(f for f in folder.glob(schema.EVAL_GLOB)
                   if not f.stem.endswith(schema.EVAL_SAMPLES_SUFFIX)) if folder.is_dir() else []
    rows, notes = [], []
    for f in files:
        got, n = read_jsonl(f)
        notes += n
        rows += [{**_flatten_eval_row(r), "source": f.stem} for r in got]
    return pd.DataFrame.from_records(rows), notes


def load_manifest(run_dir: Path) -> dict[str, Any]:
    """``manifest.json`` as a dict; ``{}`` when missing or unreadable (a run just started)."""
    return schema.read_manifest(run_dir)


def load_recipe(run_dir: Path) -> dict[str, Any]:
    """``recipe.yaml`` as a plain dict (``yaml.safe_load``); ``{}`` when missing."""
    path = Path(run_dir) / schema.RECIPE
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------- directories
def is_run_dir(path: Path) -> bool:
    """A run directory has at least one of metrics.jsonl, manifest.json, recipe.yaml."""
    p = Path(path)
    return p.is_dir() and any(
        (p / f).exists() for f in (schema.METRICS, schema.MANIFEST, schema.RECIPE)
    )


def is_ablation_dir(path: Path) -> bool:
    """An ablation directory has ablation.json."""
    return (Path(path) / schema.ABLATION).is_file()


def _seed_of(manifest: dict[str, Any], recipe: dict[str, Any]) -> int | None:
    for src in (manifest, recipe, recipe.get("train") or {}):
        if isinstance(src, dict) and isinstance(src.get("seed"), int):
            return int(src["seed"])
    return None


def run_label(name: str, seed: int | None) -> str:
    """Label of a plain run: its name without a trailing seed suffix.

    ``"hapo-s1"``, ``"hapo_seed1"``, ``"hapo-seed-1"`` with seed 1 -> ``"hapo"``, so seeds
    of one configuration aggregate. Without a known seed the name is kept as it is.
    """
    if seed is None:
        return name
    stripped = re.sub(rf"[-_.](s|seed)[-_]?{seed}$", "", name)
    return stripped or name


def load_run(
    path: Path,
    *,
    name: str | None = None,
    label: str | None = None,
    seed: int | None = None,
    tokens: bool = True,
) -> Run:
    """Load one run directory. Raises ``ValueError`` if ``path`` is not a run directory."""
    path = Path(path)
    if not is_run_dir(path):
        raise ValueError(
            f"{path} is not a run directory (expected {schema.METRICS}, {schema.MANIFEST} "
            f"or {schema.RECIPE} in it)"
        )
    manifest = load_manifest(path)
    bad_manifest = []
    if not manifest and (path / schema.MANIFEST).exists():
        bad_manifest = [f"{path / schema.MANIFEST}: unreadable (not a JSON object); "
                        "status shown as unknown"]
    recipe = load_recipe(path)
    metrics, notes = load_metrics(path / schema.METRICS)
    tok, n2 = load_tokens(path) if tokens else (pd.DataFrame(), [])
    evals, n3 = load_evals(path)
    seed = seed if seed is not None else _seed_of(manifest, recipe)
    run_name = str(manifest.get("run_name") or path.name)
    status = str(manifest.get("status") or "unknown")
    return Run(
        path=path,
        name=name or path.name,
        label=label or run_label(run_name, seed),
        seed=seed,
        status=status,
        manifest=manifest,
        recipe=recipe,
        metrics=metrics,
        tokens=tok,
        evals=evals,
        warnings=bad_manifest + notes + n2 + n3,
    )


def load_ablation(path: Path, *, label_prefix: str = "", tokens: bool = True) -> Ablation:
    """Load an ablation directory: ``ablation.json`` plus the run subfolders it plans.

    Planned runs whose folder does not exist yet are listed in the plan with their status
    and left out of ``runs``. Labels are the variant names (``label_prefix`` prepended).
    """
    path = Path(path)
    try:
        spec = json.loads((path / schema.ABLATION).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / schema.ABLATION}: cannot read ablation spec ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("plan"), list):
        raise ValueError(
            f"{path / schema.ABLATION}: expected an object with a 'plan' list, "
            f"got {type(spec).__name__}"
        )
    name = str(spec.get("name") or path.name)
    statuses = spec.get("runs") or {}
    plan_rows, runs, notes = [], [], []
    for i, entry in enumerate(spec["plan"]):
        if not isinstance(entry, dict) or "variant" not in entry:
            raise ValueError(
                f"{path / schema.ABLATION}: plan[{i}] needs a 'variant', got {entry!r}"
            )
        variant = str(entry["variant"])
        seed = entry.get("seed")
        run_dir = str(entry.get("run_dir") or schema.ablation_run_dir(variant, seed or 0))
        st = statuses.get(run_dir) or {}
        row = {
            "variant": variant,
            "seed": seed,
            "run_dir": run_dir,
            "status": st.get("status", "planned"),
            "error": st.get("error"),
        }
        sub = path / run_dir
        if is_run_dir(sub):
            run = load_run(
                sub,
                name=f"{label_prefix}{run_dir}",
                label=f"{label_prefix}{variant}",
                seed=seed,
                tokens=tokens,
            )
            run.variant, run.ablation = variant, name
            if row["status"] == "planned":
                row["status"] = run.status
            runs.append(run)
        else:
            notes.append(f"{name}: {run_dir} ({variant}, seed {seed}) has no run directory yet")
        plan_rows.append(row)
    plan = pd.DataFrame(plan_rows, columns=["variant", "seed", "run_dir", "status", "error"])
    return Ablation(path=path, name=name, plan=plan, runs=runs, warnings=notes)


def load_paths(paths: list[Path], *, tokens: bool = True) -> Collection:
    """Load run directories, ablation directories, or folders of run directories.

    With more than one input, ablation runs are labelled ``<ablation name>/<variant>`` so
    that variants of different ablations do not merge. Run names are made unique.
    """
    if not paths:
        raise ValueError("no run or ablation directory given")
    runs: list[Run] = []
    ablations: list[Ablation] = []
    notes: list[str] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise ValueError(f"{p}: not a directory")
        if is_ablation_dir(p):
            prefix = "" if len(paths) == 1 else f"{p.name}/"
            abl = load_ablation(p, label_prefix=prefix, tokens=tokens)
            ablations.append(abl)
            runs += abl.runs
            notes += abl.warnings
        elif is_run_dir(p):
            runs.append(load_run(p, tokens=tokens))
        else:
            children = sorted(c for c in p.iterdir() if is_run_dir(c) or is_ablation_dir(c))
            if not children:
                raise ValueError(
                    f"{p}: neither a run directory ({schema.METRICS}/{schema.MANIFEST}/"
                    f"{schema.RECIPE}) nor an ablation directory ({schema.ABLATION}), "
                    "nor a folder of them"
                )
            sub = load_paths(children, tokens=tokens)
            runs += sub.runs
            ablations += sub.ablations
            notes += sub.warnings
    seen: dict[str, int] = {}
    for r in runs:  # unique names: the second "AB-s1" becomes "<parent>/AB-s1"
        if r.name in seen:
            r.name = f"{r.path.parent.name}/{r.path.name}"
        seen[r.name] = seen.get(r.name, 0) + 1
        notes += r.warnings
    notes += split_labels(runs)
    return Collection(runs=runs, ablations=ablations, warnings=notes)


# ---------------------------------------------------------------- long tables
def _tag(df: pd.DataFrame, run: Run) -> pd.DataFrame:
    """Prefix the run's identity columns; a file's own column of the same name (e.g. an eval
    row's sampling `seed`) is kept as `<name>_file`."""
    clash = {c: f"{c}_file" for c in ("run", "label", "seed") if c in df.columns}
    df = df.rename(columns=clash) if clash else df.copy()
    df.insert(0, "seed", run.seed)
    df.insert(0, "label", run.label)
    df.insert(0, "run", run.name)
    return df


def stack_metrics(runs: list[Run]) -> pd.DataFrame:
    """Metrics of all runs in one long table with ``run``, ``label``, ``seed`` columns."""
    frames = [_tag(r.metrics, r) for r in runs if len(r.metrics)]
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, schema.STEP])
    return pd.concat(frames, ignore_index=True)


def stack_tokens(runs: list[Run]) -> pd.DataFrame:
    """Token samples of all runs in one long table (empty when no run has any)."""
    frames = [_tag(r.tokens, r) for r in runs if len(r.tokens)]
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, *schema.TOKEN_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def stack_evals(runs: list[Run]) -> pd.DataFrame:
    """Eval rows of all runs in one long table (empty when no run has any)."""
    frames = [_tag(r.evals, r) for r in runs if len(r.evals)]
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEYS, schema.EVAL_BENCHMARK])
    return pd.concat(frames, ignore_index=True)


def aggregate_seeds(long: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and sample std of ``column`` over the seeds of each label, per step.

    Returns columns ``label, step, mean, std, n``; steps where the metric is missing are
    dropped; ``std`` is 0 where only one seed has a value (no band is drawn there). A seed
    that stopped early leaves the later steps averaged over the seeds that reached them.
    """
    if column not in long.columns:
        return pd.DataFrame(columns=["label", schema.STEP, "mean", "std", "n"])
    d = long[["label", schema.STEP, column]].copy()
    d[column] = pd.to_numeric(d[column], errors="coerce")
    d = d.dropna(subset=[column])
    g = d.groupby(["label", schema.STEP], sort=False)[column]
    out = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    out["std"] = out["std"].fillna(0.0)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(long["label"]))}
    out["_o"] = out["label"].map(order)
    out = out.sort_values(["_o", schema.STEP]).drop(columns="_o").reset_index(drop=True)
    out["mean"] = out["mean"].astype(float)
    out["std"] = out["std"].astype(float)
    return out


def last_valid(series: pd.Series) -> float:
    """The last non-missing value of a series (NaN if none)."""
    s = pd.to_numeric(series, errors="coerce").dropna()
    return float(s.iloc[-1]) if len(s) else float("nan")


def val_columns(columns: Any) -> list[str]:
    """The ``val/<bench>/avg@k`` and ``val/<bench>/greedy`` columns, in order."""
    return [c for c in columns if isinstance(c, str) and schema.is_val_metric(c)]


__all__ = [
    "Ablation", "Collection", "Run", "aggregate_seeds", "is_ablation_dir", "is_run_dir",
    "last_valid", "load_ablation", "load_evals", "load_manifest", "load_metrics", "load_paths",
    "load_recipe", "load_run", "load_tokens", "read_jsonl", "run_label", "stack_evals",
    "stack_metrics", "stack_tokens", "val_columns",
]  # fmt: skip
