"""The training task's progress record: a small JSON file locally, plain log lines everywhere.

The local runner (and the handler) reads the file while a run is going; it is replaced
atomically (tmp + rename), so a reader never sees half a record. Remote runs have no shared
disk: the train task sends its progress as events (pipelines/task_events.py) and log lines.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.logs import event
from pipelines.result import write_json_atomic
from pipelines.task_events import TaskEvents

log = logging.getLogger(__name__)

FIELDS = ("step", "total_steps", "epoch", "loss", "updated_at")
# Passed on when the recipe gives them: each step's lr and gradient norm, and from the end of
# the first epoch on every finished epoch's report (tokens, seconds, tokens_per_second,
# peak_memory_bytes, peak_memory, the settings that shaped them), as a list in every record.
OPTIONAL_FIELDS = ("lr", "grad_norm", "epochs")


class ProgressReporter:
    """Callable the recipe invokes after each optimizer step.

    ``listener`` (remote runs: :class:`pipelines.task_events.TaskEvents`) gets every record too.
    """

    def __init__(self, path: Path | None, listener: TaskEvents | None = None) -> None:
        self.path = Path(path) if path else None
        self.listener = listener

    def __call__(self, record: dict[str, Any]) -> None:
        out = {
            "step": int(record["step"]),
            "total_steps": int(record["total_steps"]),
            "epoch": int(record["epoch"]),
            "loss": float(record["loss"]) if record.get("loss") is not None else None,
            "updated_at": datetime.now(UTC).isoformat(),
            **{k: record[k] for k in OPTIONAL_FIELDS if record.get(k) is not None},
        }
        event(log, "progress", **out)
        if self.path is not None:
            write_json_atomic(self.path, out)
        if self.listener is not None:
            self.listener.progress(out)


__all__ = ["FIELDS", "OPTIONAL_FIELDS", "ProgressReporter"]
