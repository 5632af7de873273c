"""``hapo analyze``: run/ablation directories -> figures, tables, report.md and report.html.

The HTML report embeds its images (base64 PNG) and inline CSS: it opens offline, alone.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import figures as F
from analysis import schema
from analysis.colors import Colors
from analysis.figures import MissingData, color_map
from analysis.io import Collection, load_paths, stack_evals, stack_metrics, stack_tokens
from analysis.summary import (
    REFERENCE_NOTE,
    REFERENCE_TITLE,
    reference_display,
    summarize_ablation_runs,
    summarize_runs,
    summary_baseline,
    summary_display,
    summary_markdown,
    summary_note,
    write_summary,
)
from analysis.tables import (
    dual_entropy_table,
    eval_table,
    reward_table,
    to_html_table,
    to_markdown,
)

FORMATS = ("png", "pdf", "svg")
FIGURES_DIR = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
DPI = 120
DEFAULT_SMOOTH = 0.8  # EMA weight of per-step curves (about a 5-step window); 0 = raw


@dataclass
class AnalyzeResult:
    """What ``analyze`` wrote: figure files by name, figures skipped and why, the reports."""

    out_dir: Path
    figures: dict[str, list[Path]]
    skipped: dict[str, str]
    report_md: Path
    report_html: Path
    tables: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    def skipped_lines(self) -> list[str]:
        """One line per skipped figure: ``"<name>: <reason>"``."""
        return [f"{name}: {why}" for name, why in self.skipped.items()]


@dataclass
class _FigureSpec:
    name: str
    title: str
    caption: str
    build: Callable[[], Figure]


def parse_formats(formats: list[str] | str | None) -> list[str]:
    """``["png,pdf"]``, ``["png", "pdf"]`` or ``"png,pdf"`` -> ``["png", "pdf"]``."""
    if formats is None:
        return ["png", "pdf"]
    items = [formats] if isinstance(formats, str) else list(formats)
    out = [f.strip().lower().lstrip(".") for item in items for f in str(item).split(",")]
    out = [f for f in out if f]
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"--format {','.join(items)!s}: expected a comma-separated subset of "
                         f"{', '.join(FORMATS)}, got {bad or 'nothing'}")
    return list(dict.fromkeys(out))


def default_out(paths: list[Path]) -> Path:
    """``<dir>/analysis`` for one input; ``<common parent>/analysis`` for several."""
    if len(paths) == 1:
        return Path(paths[0]) / "analysis"
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    return common / "analysis"


def _smooth_note(smooth: float) -> str:
    if not smooth:
        return " Per-step curves raw (--smooth 0)."
    return (f" Per-step curves smoothed (EMA weight {smooth:g}, `--smooth`), raw values "
            "faint behind.")


def _figure_specs(coll: Collection, colors: dict, metrics: pd.DataFrame, tokens: pd.DataFrame,
                  evals: pd.DataFrame, dual: pd.DataFrame,
                  summaries: dict[str, pd.DataFrame],
                  smooth: float = 0.0) -> tuple[list[_FigureSpec], dict]:
    sm = _smooth_note(smooth)
    specs = [
        _FigureSpec("validation_accuracy", "1. Validation accuracy",
                    "Validation accuracy per benchmark vs step (avg@k solid, greedy dashed; "
                    "raw: each point is one evaluation).",
                    lambda: F.validation_accuracy(metrics, colors)),
        _FigureSpec("token_entropy", "2. Token entropy",
                    "Mean token entropy vs step; the band spans the 20th-80th percentile." + sm,
                    lambda: F.token_entropy(metrics, colors, smooth=smooth)),
        _FigureSpec("response_length", "3. Response length",
                    "Mean response length vs step; correct (solid) vs incorrect (dashed)." + sm,
                    lambda: F.response_length(metrics, colors, smooth=smooth)),
        _FigureSpec("reward_and_fill_rate", "4. Reward, training accuracy, fill rate",
                    "Reward and training accuracy vs step; dynamic-sampling fill rate and the "
                    "fraction of groups with mixed rewards." + sm,
                    lambda: F.reward_and_fill_rate(metrics, colors, smooth=smooth)),
        _FigureSpec("clipping_patterns", "5. Clipping patterns",
                    "Low- and high-side clip fraction vs step for high-entropy (solid) and "
                    "low-entropy (dashed) tokens; entropy histograms of clipped tokens." + sm,
                    lambda: F.clipping_patterns(metrics, tokens, colors, smooth=smooth)),
        _FigureSpec("top_clipped_tokens", "6. Most clipped tokens",
                    "The 20 token strings most often clipped on each side (token samples).",
                    lambda: F.top_clipped_tokens(tokens, colors)),
        _FigureSpec("advantage_balance", "7. Advantage balance",
                    "Positive (solid) vs negative (dashed) token-advantage mass per step, "
                    "sequence-level vs token-level normalisation, and the net mass." + sm,
                    lambda: F.advantage_balance(metrics, colors, smooth=smooth)),
        _FigureSpec("ratio_vs_advantage", "8. Importance ratio vs advantage",
                    "Importance ratio against advantage for high- (h > 0) and low-entropy "
                    "tokens.",
                    lambda: F.ratio_vs_advantage(tokens, colors)),
        _FigureSpec("adaptive_temperature", "9. Adaptive temperature",
                    "Distribution of the per-token temperature and its relation to entropy.",
                    lambda: F.adaptive_temperature(tokens, metrics, colors, smooth=smooth)),
        _FigureSpec("temperature_sweep", "10. Temperature sweep",
                    "Accuracy and critical tokens vs sampling temperature, fixed vs adaptive "
                    "(`hapo evaluate`, latest checkpoint). A panel whose values vary by less "
                    "than 10 % starts at zero.",
                    lambda: F.temperature_sweep(evals, colors)),
        _FigureSpec("dual_entropy_tokens", "11. Dual-entropy tokens",
                    "Token strings found among both the highest- and the lowest-entropy "
                    "sampled tokens.",
                    lambda: F.dual_entropy_tokens(dual)),
    ]
    skipped: dict[str, str] = {}
    if not coll.ablations:
        for name in ("ablation_deltas", "ablation_curves"):
            skipped[name] = "no ablation directory among the inputs"
    for abl in coll.ablations:
        suffix = "" if len(coll.ablations) == 1 else f"_{_slug(abl.name)}"
        summ = summaries[abl.name]
        vcolors: Colors = {r.variant: colors[r.label] for r in abl.runs}
        m = stack_metrics(abl.runs)
        specs += [
            _FigureSpec(f"ablation_deltas{suffix}", f"12. Ablation {abl.name}: Δ accuracy",
                        "Paired Δ final validation accuracy vs the baseline variant (mean over "
                        "the seeds both ran of variant - baseline), error bars = its 95% "
                        "confidence interval (t over the paired differences), * = significant "
                        "(paired t-test, p < 0.05); n = paired seeds.",
                        lambda s=summ, c=vcolors: F.ablation_deltas(s, c)),
            _FigureSpec(f"ablation_curves{suffix}", f"12. Ablation {abl.name}: training curves",
                        "Training curves per variant, mean ± std over seeds." + sm,
                        lambda m=m: F.ablation_curves(m, colors, smooth=smooth)),
        ]
    return specs, skipped


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _runs_table(coll: Collection) -> pd.DataFrame:
    rows = []
    for r in coll.runs:
        m = r.metrics
        rows.append({
            "run": r.name, "label": r.label, "seed": r.seed, "status": r.status,
            "steps logged": len(m), "last step": int(m[schema.STEP].max()) if len(m) else None,
            "token rows": len(r.tokens), "eval rows": len(r.evals),
            "components": r.manifest.get("components"), "git": r.manifest.get("git_rev"),
        })
    return pd.DataFrame(rows)


def _visible(s: object) -> str:
    return str(s).replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t")


def analyze(paths: list[Path], out: Path | None = None,
            formats: list[str] | None = None, smooth: float | None = None) -> AnalyzeResult:
    """Write figures (``out/figures/<name>.<fmt>``), tables, ``report.md`` and ``report.html``.

    ``paths``: run directories, ablation directories, or folders of run directories.
    ``out``: default ``<dir>/analysis`` (one input) or ``<common parent>/analysis``.
    ``formats``: subset of png, pdf, svg (default png, pdf). A figure whose data is absent
    is skipped with its reason in ``AnalyzeResult.skipped`` and in the report.
    ``smooth``: EMA weight in [0, 1) for per-step curves (``None``: ``DEFAULT_SMOOTH``;
    0: raw), the raw values drawn faintly behind. Raises ``ValueError`` for inputs that are
    not run or ablation directories, a bad format or a smoothing weight outside [0, 1).
    """
    fmts = parse_formats(formats)
    smooth = DEFAULT_SMOOTH if smooth is None else float(smooth)
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth {smooth:g}: expected an EMA weight in [0, 1) (0 = raw, "
                         f"{DEFAULT_SMOOTH:g} = the default)")
    paths = [Path(p) for p in paths]
    coll = load_paths(paths)
    out = Path(out) if out is not None else default_out(paths)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)

    metrics, tokens, evals = stack_metrics(coll.runs), stack_tokens(coll.runs), stack_evals(
        coll.runs)
    colors = color_map(coll.labels)
    dual = dual_entropy_table(tokens)
    tables: dict[str, Path] = {}
    summaries: dict[str, pd.DataFrame] = {}
    for abl in coll.ablations:
        df = summarize_ablation_runs(abl.runs)
        df.attrs["ablation"] = abl.name
        summaries[abl.name] = df
        where = out if len(coll.ablations) == 1 else out / _slug(abl.name)
        csv_path, md_path = write_summary(df, where)
        tables[f"summary {abl.name} csv"], tables[f"summary {abl.name} md"] = csv_path, md_path

    specs, not_applicable = _figure_specs(coll, colors, metrics, tokens, evals, dual, summaries,
                                          smooth)
    skipped: dict[str, str] = {}
    written: dict[str, list[Path]] = {}
    pngs: dict[str, bytes] = {}
    notes = list(coll.warnings)
    notes += [f"{name}: {df.attrs['steps_note']}" for name, df in summaries.items()
              if df.attrs.get("unequal_steps")]
    for spec in specs:
        try:
            fig = spec.build()
        except MissingData as e:
            skipped[spec.name] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - one broken figure must not lose the others
            skipped[spec.name] = f"error: {type(e).__name__}: {e}"
            notes.append(f"figure {spec.name} failed: {type(e).__name__}: {e}")
            continue
        files = []
        for fmt in fmts:
            path = fig_dir / f"{spec.name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=DPI)
            files.append(path)
        if "png" in fmts:
            pngs[spec.name] = (fig_dir / f"{spec.name}.png").read_bytes()
        else:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI)
            pngs[spec.name] = buf.getvalue()
        written[spec.name] = files
    skipped.update(not_applicable)

    blocks = _blocks(coll, specs, written, skipped, dual, evals, summaries, notes, out)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    md_path.write_text(_render_md(blocks), encoding="utf-8")
    html_path.write_text(_render_html(blocks, pngs), encoding="utf-8")
    return AnalyzeResult(out_dir=out, figures=written, skipped=skipped, report_md=md_path,
                         report_html=html_path, tables=tables, warnings=notes,
                         runs=[r.name for r in coll.runs])


# ---------------------------------------------------------------- report rendering
# A report is a list of blocks rendered twice: ("h", level, text), ("p", text),
# ("table", DataFrame, markdown), ("fig", spec, files), ("list", [items]).


def _blocks(coll, specs, written, skipped, dual, evals, summaries, notes, out) -> list[tuple]:
    b: list[tuple] = [("h", 1, "hapo analysis")]
    b.append(("p", "Inputs: " + ", ".join(f"`{r.path}`" for r in coll.runs) + "."))
    b.append(("h", 2, "Runs"))
    runs = _runs_table(coll)
    b.append(("table", runs, to_markdown(runs)))
    partial = [r.name for r in coll.runs if r.status != schema.STATUS_DONE]
    if partial:
        b.append(("p", "Not finished (read up to the last complete record): "
                  + ", ".join(partial) + "."))
    plain = [r for r in coll.runs if r.ablation is None]
    final = summarize_runs(plain, baseline=None) if plain else pd.DataFrame()
    if len(final.columns):
        b.append(("h", 2, "Final values per label (mean ± std and 95% CI over seeds)"))
        shown = summary_display(final).rename(columns={"variant": "label"})
        b.append(("p", _steps_line(final)))
        b.append(("table", shown, to_markdown(shown)))
    for name, df in summaries.items():
        b.append(("h", 2, f"Ablation summary: {name}"))
        b.append(("p", _steps_line(df)))
        b.append(("p", summary_note(summary_baseline(df))))
        b.append(("table", summary_display(df), summary_markdown(df)))
        refs = reference_display(df)
        if len(refs):
            b.append(("h", 3, REFERENCE_TITLE))
            b.append(("p", REFERENCE_NOTE))
            b.append(("table", refs, to_markdown(refs)))
    rewards = reward_table(stack_metrics(coll.runs))
    if len(rewards):
        b.append(("h", 2, "Rewards (data.rewards)"))
        b.append(("p", "Each reward of `data.rewards` over the logged steps: mean and last of "
                  "`reward/<name>/mean`, failed calls summed (`reward/<name>/errors`), and the "
                  "mean of each other key its function returned."))
        b.append(("table", rewards, to_markdown(rewards)))
    b.append(("h", 2, "Figures"))
    for spec in specs:
        if spec.name in written:
            b.append(("fig", spec, [p.relative_to(out) for p in written[spec.name]]))
    if not written:
        b.append(("p", "No figure had data to show (see Skipped figures)."))
    if len(dual):
        shown = dual.assign(token=dual["token"].map(_visible))
        b.append(("h", 3, "Dual-entropy tokens (table)"))
        b.append(("table", shown, to_markdown(shown)))
    et = eval_table(evals)
    if len(et):
        b.append(("h", 2, "Evaluation (latest checkpoint, mean over seeds)"))
        b.append(("table", et, to_markdown(et)))
    if skipped:
        b.append(("h", 2, "Skipped figures"))
        b.append(("list", [f"{k}: {v}" for k, v in skipped.items()]))
    if notes:
        b.append(("h", 2, "Warnings"))
        b.append(("list", notes[:50] + ([f"... and {len(notes) - 50} more"]
                                        if len(notes) > 50 else [])))
    return b


def _steps_line(df: pd.DataFrame) -> str:
    """The step a summary compares, as a warning when the runs' budgets differ."""
    note = df.attrs.get("steps_note", "")
    return f"Warning: {note}" if df.attrs.get("unequal_steps") else note


def _render_md(blocks: list[tuple]) -> str:
    parts = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            parts.append("#" * blk[1] + " " + blk[2] + "\n")
        elif kind == "p":
            parts.append(_md_text(blk[1]) + "\n")
        elif kind == "table":
            parts.append(blk[2])
        elif kind == "list":
            parts.append("\n".join(f"- {_md_text(x)}" for x in blk[1]) + "\n")
        elif kind == "fig":
            spec, files = blk[1], blk[2]
            parts.append(f"### {spec.title}\n")
            png = [f for f in files if f.suffix == ".png"]
            if png:
                parts.append(f"![{spec.title}]({png[0].as_posix()})\n")
            parts.append(spec.caption + " Files: "
                         + ", ".join(f"[{f.suffix[1:]}]({f.as_posix()})" for f in files) + "\n")
    return "\n".join(parts)


def _md_text(text: str) -> str:
    """Keep '<bench>'-like text visible in markdown (it would be read as an HTML tag)."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;
padding:3px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}
figure{margin:1.5em 0}figcaption{color:#555}code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    """Markdown-ish inline text -> HTML: escape, then `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _render_html(blocks: list[tuple], pngs: dict[str, bytes]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>hapo analysis</title>",
             f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            parts.append(f"<h{blk[1]}>{_inline(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            parts.append(to_html_table(blk[1]))
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "fig":
            spec, files = blk[1], blk[2]
            data = base64.b64encode(pngs[spec.name]).decode("ascii")
            links = ", ".join(f"<a href='{html.escape(f.as_posix())}'>{f.suffix[1:]}</a>"
                              for f in files)
            parts.append(f"<figure><h3>{_inline(spec.title)}</h3>"
                         f"<img alt='{html.escape(spec.title)}' src='data:image/png;base64,"
                         f"{data}'><figcaption>{_inline(spec.caption)} Files: {links}"
                         "</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
