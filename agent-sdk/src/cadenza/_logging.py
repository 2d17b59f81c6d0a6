"""structlog, configured once: console lines on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO, cast

import structlog

_configured = False


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was configured: a
    stream swapped later (a test's capture, a daemon's redirect) is followed, and a closed
    earlier one is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Configure structlog and stdlib logging. Later calls are no-ops."""
    global _configured
    if _configured:
        return
    _configured = True
    fmt = fmt or os.environ.get("CADENZA_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    level_no = getattr(
        logging, (level or os.environ.get("CADENZA_LOG_LEVEL") or "INFO").upper(), logging.INFO
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level_no, logging.WARNING), stream=sys.stderr)
