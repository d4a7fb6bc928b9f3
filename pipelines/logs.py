"""One log format for every process of this project: one JSON object per line.

Each line has ``ts``, ``level``, ``logger`` and ``msg``; ``job_uuid`` while a job is being worked
on (the call's own ``job_uuid``, else :func:`job_context`'s); ``trace_id`` and ``span_id`` while an
OpenTelemetry span is active (outside one, in a task process, the job's ``trace_id``); then every
field the call passed in ``extra``; ``exc`` for a traceback. python-json-logger writes the JSON.
pipelines/ is the lowest layer, so handler/ (and gunicorn through it) use this formatter too; the
provider logs through llama-stack's logging, with this formatter on its handlers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Final, TextIO

from opentelemetry import trace as trace_api
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from pipelines import tracing

COMMON_FIELDS: Final = ("ts", "level", "logger", "msg")
_RENAMED: Final = {"levelname": "level", "name": "logger", "message": "msg", "exc_info": "exc"}
_CONFIGURED: Final = "_kfp_trainer_json"
# LogRecord attributes an ``extra`` key may not overwrite (logging raises KeyError for them).
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)

_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL: Final = re.compile(r"^[\d:.]+ - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")

_job_uuid: ContextVar[str | None] = ContextVar("kfp_trainer_job_uuid", default=None)
# The job's trace (hex id), for the lines a task process writes outside its own spans.
_job_trace: ContextVar[str | None] = ContextVar("kfp_trainer_job_trace", default=None)


@contextlib.contextmanager
def job_context(job_uuid: str | None) -> Iterator[None]:
    """Every line logged in this context (thread or task) carries ``job_uuid``."""
    token = _job_uuid.set(job_uuid)
    try:
        yield
    finally:
        _job_uuid.reset(token)


def set_job(job_uuid: str | None, trace: Mapping[str, Any] | None = None) -> None:
    """For a process that works on one job from start to end (a training task).

    ``trace`` (the job's ``traceparent``) names the trace on the lines written outside any
    span of this process (a library's, after the task's span ended); they get no ``span_id``.
    """
    _job_uuid.set(job_uuid)
    context = tracing.context_of(trace)
    span = trace_api.get_current_span(context).get_span_context() if context else None
    _job_trace.set(trace_api.format_trace_id(span.trace_id) if span else None)


class JsonFormatter(_JsonFormatter):
    """The one formatter: common fields first, the job and the active span, then extras."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rename_fields", dict(_RENAMED))
        kwargs.setdefault("timestamp", "ts")
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        if log_data.get("job_uuid") is None and (job := _job_uuid.get()) is not None:
            log_data["job_uuid"] = job
        context = trace_api.get_current_span().get_span_context()
        if context.is_valid:
            log_data.setdefault("trace_id", trace_api.format_trace_id(context.trace_id))
            log_data.setdefault("span_id", trace_api.format_span_id(context.span_id))
        elif (job_trace := _job_trace.get()) is not None:
            log_data.setdefault("trace_id", job_trace)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        first = {key: log_data.pop(key) for key in COMMON_FIELDS if key in log_data}
        return {**first, **log_data}


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr unless given) writing :class:`JsonFormatter` lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _CONFIGURED, True)
    return handler


def configure(
    level: str = "INFO",
    stream: TextIO | None = None,
    loggers: tuple[str, ...] = ("pipelines",),
    *,
    root: bool = True,
) -> None:
    """Make this process write JSON lines (to stderr unless given). Idempotent.

    ``loggers`` (ours) get their own handler and stop propagating, so their lines stay JSON
    while a library swaps the root logger's handlers (KFP's local runner does, for a run's
    length). With ``root`` the root logger gets one too, so library records share the format
    (gunicorn configures its own root: handler/gunicorn_conf.py).
    """
    for name in (*loggers, "") if root else loggers:
        logger = logging.getLogger(name or None)
        if not any(getattr(h, _CONFIGURED, False) for h in logger.handlers):
            logger.addHandler(json_handler(stream))
        logger.setLevel(level.upper())
        if name:
            logger.propagate = False


class JsonLineStream(io.TextIOBase):
    """A text stream for a library that prints plain lines (KFP's local runner does).

    Lines that already are JSON objects (our tasks' logs, passed through) go to ``target`` as
    they are; any other line becomes a record of ``logger`` (at ``level`` unless the line names
    its own), so it comes out in the one format. ``logger`` must not write back into this
    stream (a ``pipelines`` logger does not).
    """

    def __init__(self, target: TextIO, logger: logging.Logger, level: int = logging.INFO) -> None:
        self._target = target
        self._logger = logger
        self._level = level
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line).strip()
        if not plain:
            return
        if plain.startswith("{"):
            try:
                if isinstance(json.loads(plain), dict):
                    self._target.write(plain + "\n")
                    return
            except ValueError:
                pass
        level = _LEVEL.match(plain)
        if level:
            plain = plain[level.end() :]
        self._logger.log(logging.getLevelName(level.group(1)) if level else self._level, plain)

    def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, ""
            self._line(line)
        self._target.flush()


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with ``fields`` as JSON fields (a key logging reserves gets a ``_`` suffix)."""
    extra = {(f"{k}_" if k in _RECORD_ATTRS else k): v for k, v in fields.items()}
    logger.log(level, msg, extra=extra, stacklevel=2)


__all__ = [
    "COMMON_FIELDS",
    "JsonFormatter",
    "JsonLineStream",
    "configure",
    "event",
    "job_context",
    "set_job",
]
