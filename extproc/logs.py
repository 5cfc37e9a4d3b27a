"""structlog, configured once per process: JSON lines on stderr.

Never pass keys, tokens, JWTs or prompt text to a logger; pass the request id, the key's display
prefix, the account, the model.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVEL = logging.INFO  # the configured level: hot paths test it instead of calling a no-op logger


def debug_enabled() -> bool:
    return LEVEL <= logging.DEBUG


def configure(component: str, level: str | None = None) -> None:
    name = (level or os.environ.get("TOLLGATE_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelNamesMapping().get(name, logging.INFO)
    global LEVEL
    LEVEL = numeric
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component, pid=os.getpid())
