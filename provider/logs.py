"""The provider logs through llama-stack's logging: its handlers, its levels, its telemetry.

Records propagate to the root logger, where llama-stack 0.2.12 keeps its console handler, the
``LLAMA_STACK_LOG_FILE`` handler and the telemetry handler that attaches each line to the
request's span. Levels follow ``LLAMA_STACK_LOGGING`` (and run.yaml's ``logging``) for the
``core`` category: 0.2.12 has no post_training category, and its providers log under ``core``.
The in-process handler's and pipelines' loggers (local mode) get the same level.

With ``log_format: json`` (the default; ``KFP_TRAINER_LOG_FORMAT``) our records (loggers
``provider``, ``handler``, ``pipelines``) come out of those same handlers in the project's one
JSON format (pipelines/logs.py): the log file handler formats ours as JSON and llama-stack's
own as before; on the console, llama-stack's rich handler keeps its records and a plain JSON
stream handler beside it on the root logger, to the same stream, takes ours (rich would wrap
a JSON line into columns). llama-stack's own lines, and uvicorn's, keep llama-stack's format:
the provider does not reformat its host. ``text`` leaves every handler as llama-stack set it.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Final, Literal

from pipelines.logs import JsonFormatter, json_handler

CATEGORY: Final = "core"
OURS: Final = ("provider", "handler", "pipelines")

LogFormat = Literal["json", "text"]


def ours(record: logging.LogRecord) -> bool:
    """A record of this project's loggers."""
    return record.name.partition(".")[0] in OURS


class _Adapter(logging.LoggerAdapter):
    """llama-stack's category on every record, without dropping the call's own ``extra``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class OursAsJson(logging.Formatter):
    """A handler's formatter for llama-stack's records, the one JSON format for ours."""

    def __init__(self, theirs: logging.Formatter | None) -> None:
        super().__init__()
        self.theirs = theirs or logging.Formatter()
        self.json = JsonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        return (self.json if ours(record) else self.theirs).format(record)


class _Ours(logging.Filter):
    def __init__(self, keep_ours: bool) -> None:
        super().__init__()
        self.keep_ours = keep_ours

    def filter(self, record: logging.LogRecord) -> bool:
        return ours(record) == self.keep_ours


def _json_on_handlers(root: logging.Logger) -> None:
    """Our records as JSON on llama-stack's root handlers (see the module docstring)."""
    from rich.logging import RichHandler

    for handler in list(root.handlers):
        if isinstance(handler, RichHandler):
            if any(isinstance(f, _Ours) for f in handler.filters):
                continue
            handler.addFilter(_Ours(keep_ours=False))
            beside = json_handler(handler.console.file)
            beside.setLevel(handler.level)
            beside.addFilter(_Ours(keep_ours=True))
            root.addHandler(beside)
        elif type(handler) in (logging.StreamHandler, logging.FileHandler) and not isinstance(
            handler.formatter, (OursAsJson, JsonFormatter)
        ):
            handler.setFormatter(OursAsJson(handler.formatter))


def configure(log_format: LogFormat = "json") -> None:
    """Give our loggers llama-stack's level for ``core``, let them propagate, and with
    ``json`` have llama-stack's handlers write our records as JSON (idempotent)."""
    from llama_stack.log import get_logger

    for name in OURS:
        level = get_logger(name, category=CATEGORY).logger.level
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = True
    if log_format == "json":
        _json_on_handlers(logging.getLogger())


def get(name: str) -> logging.LoggerAdapter:
    """A provider logger that carries llama-stack's category (its file format names it)."""
    return _Adapter(logging.getLogger(name), {"category": CATEGORY})
