"""User-facing error types: the CLI prints them as one red line and exits 2."""


class HapoError(ValueError):
    """A user error (bad input file, model path, run directory...): one line, names what and why."""


class RunDirError(HapoError):
    """The output directory holds a different run, or nothing to resume."""


class RunFailed(HapoError):
    """A run that started and could not go on (disk full...): one line, exit 1, manifest failed."""

    exit_code = 1
