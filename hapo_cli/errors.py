"""User-facing error types: the CLI prints them as one red line and exits 2."""


def first_line(exc: BaseException) -> str:
    """An exception as one line (its first, at most 200 characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class HapoError(ValueError):
    """A user error (bad input file, model path, run directory...): one line, names what and why."""


class RecipeError(ValueError):
    """A user error in a recipe, an override or a component string: one line, names the field."""


class RunDirError(HapoError):
    """The output directory holds a different run, or nothing to resume."""


class RunFailed(HapoError):
    """A run that started and could not go on (disk full...): one line, exit 1, manifest failed."""

    exit_code = 1
