"""math-verify, imported on first use, with its one-time "Timeout is disabled" warning
dropped: we pass timeout=None on purpose and bound each call ourselves (see verify.py)."""

from __future__ import annotations

import logging
from typing import Any

# `parse(..., parsing_timeout=NO_TIMEOUT)`: math-verify documents None (no signal-based timeout)
# but annotates the parameter `int`
NO_TIMEOUT: Any = None

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
