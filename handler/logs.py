"""The handler's logs: pipelines' one JSON format (pipelines/logs.py), on stdout, gunicorn's too.

Log calls pass context as ``extra={...}``; every such field becomes a JSON field, so
``log.info("job queued", extra={"job_uuid": u})`` is searchable by ``job_uuid``. gunicorn's
access records carry their atoms in ``record.args``; they become method, path, status and
duration fields instead of a preformatted line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from pipelines import logs as _logs


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    def atom(key: str) -> Any:
        try:
            return atoms[key]
        except (KeyError, TypeError):
            return None

    duration_us = atom("D")
    return {
        "method": atom("m"),
        "path": atom("U"),
        "query": atom("q") or None,
        "status": int(atom("s")) if str(atom("s")).isdigit() else atom("s"),
        "duration_ms": round(int(duration_us) / 1000, 3) if duration_us is not None else None,
        "bytes": atom("B"),
        "remote": atom("h"),
        "user_agent": atom("a"),
        "pid": atom("p"),  # the worker that answered
    }


class JsonFormatter(_logs.JsonFormatter):
    """The common format; a gunicorn access record becomes ``msg: request`` plus its atoms."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            fields = _access_fields(record.args)
            record = logging.makeLogRecord({**record.__dict__, "msg": "request", "args": None})
            record.__dict__.update(fields)
        return super().format(record)


def configure(level: str = "INFO") -> None:
    """Send the ``handler`` and ``pipelines`` loggers to stdout as JSON (idempotent); gunicorn's
    config does the root logger's."""
    _logs.configure(level, stream=sys.stdout, loggers=("handler", "pipelines"), root=False)


def get(name: str) -> logging.Logger:
    """A logger under the ``handler`` namespace."""
    return logging.getLogger(name if name.startswith("handler") else f"handler.{name}")
