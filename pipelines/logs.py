"""Structured (one JSON object per line) logging for the pipeline's processes.

Training tasks run as subprocesses (locally) or pods (remotely); their stdout is the only log
anyone sees, so every line is machine-readable: ``{"ts", "level", "logger", "msg", ...fields}``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line; ``extra={"fields": {...}}`` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Send the ``pipelines`` loggers to ``stream`` (stderr) as JSON lines. Idempotent."""
    root = logging.getLogger("pipelines")
    root.setLevel(level.upper())
    for handler in root.handlers:
        if getattr(handler, "_kfp_trainer", False):
            return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._kfp_trainer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    logger.log(level, msg, extra={_FIELDS: fields})


__all__ = ["JsonFormatter", "configure", "event"]
