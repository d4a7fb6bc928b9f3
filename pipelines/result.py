"""What one training run produced, as a value: the shape of result.json and of `run`'s output.

Callers (the handler's local and remote backends) build a job's status from this alone, so it
carries everything: outcome, error, per-epoch checkpoints in llama-stack's ``Checkpoint`` shape,
metrics, resources and the number of rows the trainer actually read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

Status = Literal["completed", "failed", "cancelled"]
STATUSES: Final = ("completed", "failed", "cancelled")


@dataclass
class RunResult:
    """One run's outcome.

    ``checkpoints`` items: identifier, created_at (ISO 8601), epoch, post_training_job_id, path,
    training_metrics {epoch, train_loss, validation_loss, perplexity} (validation_loss and
    perplexity are null when the job has no validation dataset).
    ``metrics``: one dict per epoch (epoch, train_loss, validation_loss, perplexity, steps,
    tokens (input tokens, padding not counted), seconds and tokens_per_second of its training
    steps, peak_memory_bytes and what it is (peak_memory: ``cuda_max_memory_allocated`` over the
    epoch's steps, or ``process_peak_rss`` so far), settings (what shaped speed and memory:
    device, dtype, batch size, accumulation, sequence limit, activation checkpointing and
    offloading, compile, loss chunks, max_grad_norm, LoRA rank, trainable params)).
    ``resources_allocated``: device, device_name, dtype, requested_dtype, peak_memory_bytes (the
    largest epoch's), peak_memory_gb, peak_memory, settings.
    ``dataset_rows``: rows read from the dataset; ``rows_without_trainable_tokens``: how many
    of them truncation to the model's sequence limit left with no token to learn from (they
    are skipped; when none is left the run fails instead, naming the limit).
    ``datasets``: per request field (``dataset``, ``validation_dataset``), what the trainer
    read (pipelines.data.DatasetRead: dataset, uri, format, rows, sha256 of the bytes,
    rows_sha256 of the conversations).
    ``resources_allocated`` is None until training started (never an empty dict).
    """

    job_uuid: str
    status: Status
    error: str | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resources_allocated: dict[str, Any] | None = None
    dataset_rows: int | None = None
    rows_without_trainable_tokens: int | None = None  # cut to the sequence limit: not trained on
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: expected one of {', '.join(STATUSES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """The inverse of :meth:`to_dict`; unknown keys are an error (they would be lost)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RunResult fields: {', '.join(sorted(unknown))}")
        return cls(
            job_uuid=data["job_uuid"],
            status=data["status"],
            error=data.get("error"),
            checkpoints=list(data.get("checkpoints") or []),
            metrics=list(data.get("metrics") or []),
            resources_allocated=dict(data["resources_allocated"])
            if data.get("resources_allocated")
            else None,
            dataset_rows=data.get("dataset_rows"),
            rows_without_trainable_tokens=data.get("rows_without_trainable_tokens"),
            datasets=dict(data.get("datasets") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def write(self, path: Path) -> Path:
        """Write atomically (tmp + rename): a reader sees the old file or the whole new one."""
        return write_json_atomic(Path(path), self.to_dict())


def write_json_atomic(path: Path, value: Any) -> Path:
    """Replace ``path`` with ``value`` as JSON without ever exposing a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["STATUSES", "RunResult", "Status", "write_json_atomic"]
