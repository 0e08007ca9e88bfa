"""structlog configured once per process: one JSON object per line on stderr.

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``service`` and ``event``; bind
``request_id`` / ``adapter_id`` with :func:`request_logger`. Standard-library loggers (aiokafka,
redis) go through the same renderer so a log shipper sees one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from lorafleet.common import settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _level_number(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"LORAFLEET_LOG_LEVEL must be one of {', '.join(_LEVELS)}, got {level!r}") from None


class _ServiceField:
    """Labels lines with the process's service name unless their logger bound one (get_logger):
    standard-library loggers' lines, and structlog loggers made without get_logger."""

    def __init__(self, service: str) -> None:
        self.service = service

    def __call__(self, _logger: Any, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("service", self.service)
        return event_dict


def configure_logging(service: str, level: str | None = None) -> None:
    """Set up JSON logs to stderr for this process; `level` defaults to LORAFLEET_LOG_LEVEL.

    Calling it again (several services in one process) re-configures; the ``service`` field is
    bound per logger by :func:`get_logger`, so each service's lines stay labelled.
    """
    number = _level_number(level if level is not None else settings.read("LOG_LEVEL"))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, _ServiceField(service), structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _ServiceField(service)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_lorafleet", False)]
    handler._lorafleet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(number)
    # Client libraries are chatty at info (every rebalance, every connection): keep their warnings.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(number, logging.WARNING))


def get_logger(service: str, **bound: Any) -> Any:
    """A structlog logger with ``service`` (and anything in `bound`) on every line."""
    # A lazy proxy: safe to create at import time, before configure_logging runs.
    return structlog.get_logger(f"lorafleet.{service}", service=service, **bound)


def request_logger(log: Any, request_id: str, adapter_id: str | None = None) -> Any:
    """`log` with the request's id and adapter bound (adapter_id null means the base model)."""
    return log.bind(request_id=request_id, adapter_id=adapter_id)
