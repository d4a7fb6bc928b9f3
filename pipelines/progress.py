"""The training task's progress record: a small JSON file locally, plain log lines everywhere.

The local runner (and the handler) reads the file while a run is going; it is replaced
atomically (tmp + rename), so a reader never sees half a record. Remote runs have no shared
disk and rely on the log lines.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.logs import event
from pipelines.result import write_json_atomic

log = logging.getLogger(__name__)

FIELDS = ("step", "total_steps", "epoch", "loss", "updated_at")


class ProgressReporter:
    """Callable the recipe invokes after each optimizer step."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None

    def __call__(self, record: dict[str, Any]) -> None:
        out = {
            "step": int(record["step"]),
            "total_steps": int(record["total_steps"]),
            "epoch": int(record["epoch"]),
            "loss": float(record["loss"]) if record.get("loss") is not None else None,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        event(log, "progress", **out)
        if self.path is not None:
            write_json_atomic(self.path, out)


__all__ = ["FIELDS", "ProgressReporter"]
