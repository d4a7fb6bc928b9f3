"""The provider logs through llama-stack's logging: its handlers, its levels, its telemetry.

Records propagate to the root logger, where llama-stack 0.2.12 keeps its console handler, the
``LLAMA_STACK_LOG_FILE`` handler and the telemetry handler that attaches each line to the
request's span. Levels follow ``LLAMA_STACK_LOGGING`` (and run.yaml's ``logging``) for the
``core`` category: 0.2.12 has no post_training category, and its providers log under ``core``.
The in-process handler's and pipelines' loggers (local mode) get the same level.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Final

CATEGORY: Final = "core"
_OURS: Final = ("provider", "handler", "pipelines")


class _Adapter(logging.LoggerAdapter):
    """llama-stack's category on every record, without dropping the call's own ``extra``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def configure() -> None:
    """Give our loggers llama-stack's level for ``core`` and let them propagate (idempotent)."""
    from llama_stack.log import get_logger

    for name in _OURS:
        level = get_logger(name, category=CATEGORY).logger.level
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = True


def get(name: str) -> logging.LoggerAdapter:
    """A provider logger that carries llama-stack's category (its file format names it)."""
    return _Adapter(logging.getLogger(name), {"category": CATEGORY})
