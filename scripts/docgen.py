"""Generated parts of the docs site, built from the code at `mkdocs build` time so they cannot
drift: the recipe reference (every field of `hapo_cli.recipe.Recipe`, from its pydantic type,
default and description) and the CLI reference (every `hapo` command and option, from typer's
click command tree).

Used as a mkdocs hook (`hooks:` in mkdocs.yml): a page that holds the line
`<!-- generated: recipe-reference -->` or `<!-- generated: cli-reference -->` gets that
marker replaced by the generated Markdown. `python scripts/docgen.py recipes|cli` prints it.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
from typing import Any

MARKERS = {
    "<!-- generated: recipe-reference -->": "recipes",
    "<!-- generated: cli-reference -->": "cli",
}


# ------------------------------------------------------------------------------------------
# recipe reference
# ------------------------------------------------------------------------------------------


def _sections_in(annotation: Any) -> list[type]:
    """The recipe section classes (pydantic models) an annotation holds: `X`, `X | None`,
    `list[X]`."""
    from hapo_cli.section_base import _Section

    if isinstance(annotation, type) and issubclass(annotation, _Section):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        out.extend(_sections_in(arg))
    return out


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " | ".join(repr(m.value) for m in annotation)
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that takes the validated data
            return "(computed)"
        if _sections_in(type(value)):
            return "(section)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "(required)"
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """One table cell: one line, `|` escaped; outside code spans `<`, `>` (help text such as
    <out>/<name>.jsonl is not HTML) and `[`, `]` (hf:NAME[:CONFIG][@SPLIT] is not a link)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = (parts[i].replace("<", "&lt;").replace(">", "&gt;")
                    .replace("[", "\\[").replace("]", "\\]"))  # not a reference link
    return "`".join(parts)


def recipe_fields(model: type | None = None, prefix: str = "") -> list[tuple[str, Any, type]]:
    """Every (dotted path, FieldInfo, owning section) of the recipe tree, depth first; a
    nested section's own path is listed before its fields."""
    if model is None:
        from hapo_cli.recipe import Recipe

        model = Recipe
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append((path, field, model))
        for sub in _sections_in(field.annotation):
            out.extend(recipe_fields(sub, prefix=f"{path}."))
    return out


def recipe_reference() -> str:
    """Markdown: one table per section of the recipe tree, every field with its type, default
    and description."""
    from hapo_cli.recipe import Recipe

    tables: dict[str, list[str]] = {}
    order: list[str] = []

    def visit(model: type, prefix: str) -> None:
        key = prefix.rstrip(".") or "(top level)"
        if key not in tables:
            tables[key] = []
            order.append(key)
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            tables[key].append(
                f"| `{path}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} "
                f"| {_cell(field.description or '')} |"
            )
            for sub in _sections_in(field.annotation):
                visit(sub, f"{path}.")

    visit(Recipe, "")
    lines: list[str] = []
    for key in order:
        lines += [f"### `{key}`" if key != "(top level)" else "### Top level", "",
                  "| field | type | default | description |", "| --- | --- | --- | --- |",
                  *tables[key], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI reference
# ------------------------------------------------------------------------------------------


def _param_row(p: Any) -> str:
    """One table row of a typer parameter (typer >= 0.29 vendors click: read it by duck type)."""
    descriptor = getattr(p, "type_descriptor", None)
    type_name = _type_name(descriptor.annotation) if descriptor is not None else ""
    if p.param_type_name == "argument":
        names = f"`{p.name.upper()}`"
        kind = f"argument: {type_name}" + ("" if p.required else " (optional)")
    else:
        names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        kind = "flag" if getattr(p, "is_flag", False) else type_name
    default = ""
    if not p.required and p.default is not None and not callable(p.default):
        if not (isinstance(p.default, (list, tuple)) and not p.default):
            default = f"`{p.default}`"
    return f"| {names} | {_cell(kind)} | {_cell(default)} | {_cell(p.help or '')} |"


def _command_md(cmd: Any, path: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", ""]
    if cmd.help:
        lines += ["```text", cmd.help.strip(), "```", ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]
    if params:
        lines += ["| name | kind | default | help |", "| --- | --- | --- | --- |",
                  *(_param_row(p) for p in params), ""]
    if getattr(cmd, "commands", None):
        for name, sub in cmd.commands.items():
            if not getattr(sub, "hidden", False):
                lines += _command_md(sub, f"{path} {name}", min(level + 1, 6))
    return lines


def cli_reference() -> str:
    """Markdown: every `hapo` command, its help and its options, from typer's command tree."""
    import typer

    from hapo_cli.cli import app

    group = typer.main.get_command(app)
    lines = []
    top = [p for p in group.params if p.name != "help"]
    if top:
        lines += ["### `hapo` (options before the command)", "",
                  "| name | kind | default | help |", "| --- | --- | --- | --- |",
                  *(_param_row(p) for p in top), ""]
    for name, cmd in group.commands.items():
        if not getattr(cmd, "hidden", False):
            lines += _command_md(cmd, f"hapo {name}", 3)
    return "\n".join(lines)


GENERATORS = {"recipes": recipe_reference, "cli": cli_reference}


# ------------------------------------------------------------------------------------------
# mkdocs hook
# ------------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, name in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, GENERATORS[name]())
    return markdown


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GENERATORS:
        sys.exit(f"usage: python scripts/docgen.py {{{'|'.join(GENERATORS)}}}")
    print(GENERATORS[sys.argv[1]]())
