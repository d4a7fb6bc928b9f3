"""The backend interface of local mode's service, whatever runs the pipeline: one base class.

``local`` runs each job as a process on this machine (KFP's SubprocessRunner); ``noop`` and
``hold`` run nothing (benchmarks, smoke tests). Optional features are class attributes with
defaults here, so the service reads them, never probes for them. Remote mode has no backend of
this kind: its state is KFP itself (handler/remote/). ``RunState`` and the two errors are shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

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
    scheduled_at: datetime | None = None  # when the backend accepted the run (KFP: created_at)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: dict[str, Any] | None = None  # step, total_steps, epoch, loss
    # On completion: checkpoints, metrics, resources_allocated, dataset_rows (pipelines' result).
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Backend(ABC):
    """Submit, observe and cancel pipeline runs for local mode's store. Every method is safe to
    call twice.

    Construction (fixed; every backend follows it)::

        backend = BackendClass(settings: HandlerSettings, store: handler.store.JobStore)

    ``handler.backends.load_backend(settings, store)`` is the one lookup that picks the class:
    ``settings.backend`` (``KFP_TRAINER_BACKEND``) if set, else ``local``, looked up in
    ``handler.backends.BACKENDS``; a ``"package.module:Class"`` value is imported as given. One
    instance per service; the constructor must do no I/O (build clients on first use).

    What a backend may use of the store (safe across threads and gunicorn worker processes):
    ``store.request(job_uuid) -> dict`` (the job.requested data, model_artifact.uri resolved),
    ``store.backend_state(job_uuid) -> dict`` and ``store.set_backend_state(job_uuid, state)``
    (a small JSON-able dict private to the backend, e.g. a pid, kept across restarts).

    States: ``status()`` answers ``JobStatus.scheduled`` while the run waits, ``in_progress``
    while it runs, and a terminal status with ``result`` (pipelines' RunResult dict) and
    ``error`` once it ended. ``cancel()`` only asks; the terminal state comes from ``status()``.
    """

    name: ClassVar[str]
    # Runs active at once across all workers; None: submit every queued job at once.
    max_concurrent: int | None = None
    # How often the owning worker calls status() for its active jobs; None: only when a
    # run.finished notice or a ping asks.
    poll_interval_s: float | None = None

    @abstractmethod
    def submit(self, request: dict[str, Any]) -> str:
        """Start (or find the already started) run for ``request['job_uuid']``; return its run id.

        :raises BackendUnavailable: transient; retry later.
        :raises BackendRejected: permanent; the message names the problem.
        """

    @abstractmethod
    def status(self, job_uuid: str, run_id: str | None) -> RunState: ...

    @abstractmethod
    def cancel(self, job_uuid: str, run_id: str | None) -> None: ...

    @abstractmethod
    def ready(self) -> bool:
        """True when the backend can accept work now (backs /readyz)."""
