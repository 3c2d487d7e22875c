"""One structlog configuration for all three services: JSON lines on stdout, with whatever the
request interceptor and the domain code bound into context (request_id, rpc, task_key, pod)."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(service: str, level: str = "info", *, json: bool = True) -> structlog.stdlib.BoundLogger:
    """Configure process-wide logging once, at start-up, and return the service's root logger."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    # orjson renders bytes several times faster than json.dumps; logs are on every hot path.
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer)
        if json
        else structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(service=service)
    return logger


BoundLogger = structlog.stdlib.BoundLogger


def get_logger(**bound: object) -> BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(**bound)
    return logger
