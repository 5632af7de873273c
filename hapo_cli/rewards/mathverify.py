"""math-verify, imported on first use, with its one-time "Timeout is disabled" warning
dropped: we pass timeout=None on purpose and bound each call ourselves (see verify.py)."""

from __future__ import annotations

import logging


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_ready = False


def math_verify_module():
    global _ready
    import math_verify

    if not _ready:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _ready = True
    return math_verify
