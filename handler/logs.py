"""Structured logs: one JSON object per line on stdout, for the handler and for gunicorn.

Log calls pass context as ``extra={...}``; every non-standard record attribute becomes a JSON
field, so ``log.info("job queued", extra={"job_uuid": u})`` is searchable by ``job_uuid``.
gunicorn's access records carry their atoms in ``record.args``; they become method, path, status
and duration fields instead of a preformatted line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
_CONFIGURED_ATTR: Final = "_kfp_trainer_json"


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    def atom(key: str) -> Any:
        try:
            return atoms[key]
        except (KeyError, TypeError):
            return None

    duration_us = atom("D")
    return {
        "msg": "request",
        "method": atom("m"),
        "path": atom("U"),
        "query": atom("q") or None,
        "status": int(atom("s")) if str(atom("s")).isdigit() else atom("s"),
        "duration_ms": round(int(duration_us) / 1000, 3) if duration_us is not None else None,
        "bytes": atom("B"),
        "remote": atom("h"),
        "user_agent": atom("a"),
    }


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line (ts, level, logger, msg and any extra fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            out.update(_access_fields(record.args))
        else:
            out["msg"] = record.getMessage()
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def stdout_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _CONFIGURED_ATTR, True)
    return handler


def configure(level: str = "INFO") -> None:
    """Send the ``handler`` loggers to stdout as JSON (idempotent; the edge calls it once)."""
    logger = logging.getLogger("handler")
    logger.setLevel(level)
    if not any(getattr(h, _CONFIGURED_ATTR, False) for h in logger.handlers):
        logger.addHandler(stdout_handler())
    logger.propagate = False


def get(name: str) -> logging.Logger:
    """A logger under the ``handler`` namespace."""
    return logging.getLogger(name if name.startswith("handler") else f"handler.{name}")
