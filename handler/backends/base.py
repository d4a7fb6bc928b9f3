"""The backend interface the handler's event logic talks to, whatever runs the pipeline.

Local mode runs KFP's SubprocessRunner on this machine; remote mode talks to a KFP server. Both
answer in the same values, so the event logic never asks which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from handler.contract import JobStatus


class BackendUnavailable(RuntimeError):
    """The backend cannot be reached right now; the caller answers 503 and nothing is lost."""


class BackendRejected(ValueError):
    """The backend refused the job for good (e.g. the model artifact does not exist)."""


@dataclass(frozen=True)
class RunState:
    """What the backend knows about one job's run, in contract terms."""

    status: JobStatus
    run_id: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: dict[str, Any] | None = None  # step, total_steps, epoch, loss
    # On completion: checkpoints, metrics, resources_allocated, dataset_rows (pipelines' result).
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Backend(Protocol):
    """Submit, observe and cancel pipeline runs. Every method is safe to call twice."""

    name: str

    def submit(self, request: dict[str, Any]) -> str:
        """Start (or find the already started) run for ``request['job_uuid']``; return its run id.

        :raises BackendUnavailable: transient; retry later.
        :raises BackendRejected: permanent; the message names the problem.
        """
        ...

    def status(self, job_uuid: str, run_id: str | None) -> RunState: ...

    def cancel(self, job_uuid: str, run_id: str | None) -> None: ...

    def ready(self) -> bool:
        """True when the backend can accept work now (backs /readyz)."""
        ...
