"""The provider logs through llama-stack's logging: its handlers, its levels, its telemetry.

Records propagate to the root logger, where llama-stack 0.2.12 keeps its console handler, the
``LLAMA_STACK_LOG_FILE`` handler and the telemetry handler that attaches each line to the
request's span. Levels follow ``LLAMA_STACK_LOGGING`` (and run.yaml's ``logging``) for the
``core`` category: 0.2.12 has no post_training category, and its providers log under ``core``.
The in-process handler's and pipelines' loggers (local mode) get the same level.

With ``log_format: json`` (the default; ``KFP_TRAINER_LOG_FORMAT``) the server's output is the
project's one JSON format (pipelines/logs.py) from the provider's start on, whoever logs:
llama-stack's console handler (rich, which would wrap a JSON line into columns and draw a
traceback as a panel) gives way to a plain stream handler on the same stream, with the same
level and filters; its log file handler gets the JSON formatter; Python warnings become log
records; and the two formatters of ``uvicorn.config.LOGGING_CONFIG``, the configuration
``uvicorn.run`` applies after the providers are built, become JSON ones (an access line is
``msg: request`` with method, path, status fields, as the handler's are). What llama-stack
writes before it imports the provider is reached by provider/startup_logs.py instead, which
calls :func:`json_everywhere` as soon as llama-stack has set up its logging.
``text`` leaves every handler as llama-stack and uvicorn set them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import MutableMapping
from typing import Any, Final, Literal

from pipelines.logs import JsonFormatter, json_handler

CATEGORY: Final = "core"
OURS: Final = ("provider", "handler", "pipelines")

LogFormat = Literal["json", "text"]


class _Adapter(logging.LoggerAdapter):
    """llama-stack's category on every record, without dropping the call's own ``extra``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class UvicornFormatter(JsonFormatter):
    """uvicorn's records in the one format: an access record becomes ``msg: request`` with its
    parts as fields (the names of the handler's access lines); ``color_message`` (the same
    message with terminal colours) is left out.

    uvicorn logs access as ``'%s - "%s %s HTTP/%s" %d'`` with (client, method, path, HTTP
    version, status) as ``args``.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: value for key, value in record.__dict__.items() if key != "color_message"}
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            remote, method, full_path, http_version, status = record.args
            path, _, query = str(full_path).partition("?")
            fields |= {
                "msg": "request",
                "args": None,
                "method": method,
                "path": path,
                "query": query or None,
                "status": status,
                "remote": remote,
                "http_version": http_version,
            }
        return super().format(logging.makeLogRecord(fields))


def _loggers() -> list[logging.Logger]:
    """The root logger and every logger created so far (llama-stack's categories among them)."""
    named = logging.root.manager.loggerDict.values()
    return [logging.getLogger(), *(lg for lg in named if isinstance(lg, logging.Logger))]


def _json_console(rich: logging.Handler) -> None:
    """A plain JSON stream handler in place of llama-stack's rich one: its stream, level and
    filters (llama-stack's category filter among them)."""
    handler = json_handler(rich.console.file)  # type: ignore[attr-defined]
    handler.setLevel(rich.level)
    for record_filter in rich.filters:
        handler.addFilter(record_filter)
    for logger in _loggers():
        if rich in logger.handlers:
            logger.removeHandler(rich)
            logger.addHandler(handler)


def json_everywhere() -> None:
    """Every record as JSON: llama-stack's handlers, Python warnings, uvicorn's handlers."""
    from rich.logging import RichHandler
    from uvicorn.config import LOGGING_CONFIG

    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, RichHandler):
            _json_console(handler)
        elif type(handler) in (logging.StreamHandler, logging.FileHandler) and not isinstance(
            handler.formatter, JsonFormatter
        ):
            handler.setFormatter(JsonFormatter())
    if getattr(warnings.showwarning, "__module__", None) == "warnings":
        # Python's own (LLAMA_STACK_TRACE_WARNINGS puts one that prints the stack, kept).
        logging.captureWarnings(True)
    # uvicorn.run passes no log_config, so Config takes this dict: its handlers, our formatters.
    LOGGING_CONFIG["formatters"]["default"] = {"()": UvicornFormatter}
    LOGGING_CONFIG["formatters"]["access"] = {"()": UvicornFormatter}


def configure(log_format: LogFormat = "json") -> None:
    """Give our loggers llama-stack's level for ``core``, let them propagate, and with
    ``json`` make every handler of the server write the one JSON format (idempotent)."""
    from llama_stack.log import get_logger

    for name in OURS:
        level = get_logger(name, category=CATEGORY).logger.level
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = True
    if log_format == "json":
        json_everywhere()


def get(name: str) -> logging.LoggerAdapter:
    """A provider logger that carries llama-stack's category (its file format names it)."""
    return _Adapter(logging.getLogger(name), {"category": CATEGORY})
