"""The README and the docs site: every relative link resolves, the README stays a front door
(at most README_MAX_LINES lines), and the generated references cover every recipe field and
every CLI command. Fast, no mkdocs needed (`make docs` builds the site with --strict in CI)."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

# [text](target) and ![alt](target); the target up to whitespace or ")" (an optional "title"
# after it is ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    # docs/reference-results links to results/reference (rglob does not follow it): its tables
    # are generated files, not pages written here.
    return [f for f in files if "reference-results" not in f.relative_to(ROOT).parts]


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link outside code blocks and code spans."""
    out, in_fence = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page
            out.append((n, target))
    return out


def test_the_markdown_files_are_found():
    names = {str(f.relative_to(ROOT)) for f in markdown_files()}
    assert {"README.md", "docs/index.md", "docs/concepts.md", "docs/recipes.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path):
    broken = []
    for n, target in relative_links(path):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_skips_code(tmp_path: Path):
    md = tmp_path / "x.md"
    md.write_text("[a](a.md) ![b](img/b.png) [c](https://x.org) [d](#top) `[e](e.md)`\n"
                  "```\n[f](f.md)\n```\n[g](g.md#part)\n")
    assert relative_links(md) == [(1, "a.md"), (1, "img/b.png"), (5, "g.md#part")]


def test_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


def _docgen():
    spec = importlib.util.spec_from_file_location("docgen", ROOT / "scripts" / "docgen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _models_in(annotation) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _field_paths(model: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a pydantic model tree (independent of scripts/docgen.py)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        for sub in _models_in(field.annotation):
            paths += _field_paths(sub, f"{prefix}{name}.")
    return paths


def test_recipe_reference_covers_every_field():
    from hapo_cli.recipe import Recipe

    text = _docgen().recipe_reference()
    paths = _field_paths(Recipe)
    assert len(paths) > 100  # the tree is walked into its sections, not just the top level
    missing = [p for p in paths if f"| `{p}` |" not in text]
    assert not missing, f"fields missing from the recipe reference: {missing}"
    # one row per field, each with its description
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(paths)
    lr = Recipe.model_fields["train"].annotation.model_fields["lr"]
    assert lr.description.split()[0] in next(r for r in rows if r.startswith("| `train.lr` |"))


def test_cli_reference_covers_every_command():
    import typer

    from hapo_cli.cli import app

    text = _docgen().cli_reference()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert f"### `hapo {name}`" in text
        for sub in getattr(cmd, "commands", {}) or {}:
            assert f"`hapo {name} {sub}`" in text
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                assert f"`{p.opts[0]}`" in text


def test_doc_pages_hold_their_generated_markers():
    markers = _docgen().MARKERS
    pages = {"recipes": ROOT / "docs" / "recipes.md", "cli": ROOT / "docs" / "cli.md"}
    for marker, name in markers.items():
        assert marker in pages[name].read_text(encoding="utf-8")


def test_code_cites_docs_that_exist():
    """The design the code cites lives in docs/: no `DESIGN.md` (outside the repository), and
    every `docs/<page>.md` a source file names exists."""
    cited = re.compile(r"docs/[\w./-]+?\.md")
    problems = []
    for folder in ("hapo_cli", "analysis", "bench", "scripts", "recipes", "tests", "tests_vllm"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix not in {".py", ".yaml", ".sh"} or f.name == "test_docs_links.py":
                continue
            text = f.read_text(encoding="utf-8")
            if "DESIGN.md" in text:
                problems.append(f"{f.relative_to(ROOT)}: cites DESIGN.md")
            problems += [f"{f.relative_to(ROOT)}: {m} does not exist"
                         for m in cited.findall(text) if not (ROOT / m).exists()]
    assert not problems, "\n".join(problems)
