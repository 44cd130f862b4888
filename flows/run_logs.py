"""What a run's child processes print, into the run's logs in the Prefect UI: one line, one log record."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flows.runtime.process import LineHandler

RunLogger = logging.Logger | logging.LoggerAdapter[logging.Logger]
"""What `get_run_logger()` returns."""


def line_logger(logger: RunLogger, redact: Callable[[str], str]) -> LineHandler:
    """A line handler that logs stdout lines as INFO and stderr lines as WARNING, each passed through `redact`
    first (flows/runtime/redaction.py): a child prints what it likes, its patient's name included."""

    def log_line(stream: str, line: str) -> None:
        logger.log(logging.WARNING if stream == "stderr" else logging.INFO, "%s", redact(line))

    return log_line
