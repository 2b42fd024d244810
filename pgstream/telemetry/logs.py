"""Structured log lines (``pgstream run --log-format json``): one JSON object per line.

Every line has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``; ``job`` and
``worker`` once they are known; ``stream`` and ``partition`` when the line is about one
partition (log calls pass them with ``extra={"stream": ..., "partition": ...}``); ``error``
with the traceback when one is logged.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import orjson

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "set_context"]

#: fields a log call may add with ``extra=``, copied into the JSON object when present
CONTEXT_FIELDS = ("job", "worker", "stream", "partition")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``context`` adds fields to every line (the job and
    worker, set once they are known)."""

    def __init__(self, **context: str) -> None:
        super().__init__()
        self.context: dict[str, str] = dict(context)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.context,
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def set_context(**fields: str) -> None:
    """Add ``fields`` (e.g. ``job=...``) to every JSON line from now on (no-op for text logs)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.context.update(fields)
