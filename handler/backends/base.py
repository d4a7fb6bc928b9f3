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
    # When the backend accepted the run (KFP: created_at); a job re-adopted from the backend
    # after the store lost it is scheduled then.
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: dict[str, Any] | None = None  # step, total_steps, epoch, loss
    # On completion: checkpoints, metrics, resources_allocated, dataset_rows (pipelines' result).
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Backend(Protocol):
    """Submit, observe and cancel pipeline runs. Every method is safe to call twice.

    Construction (fixed; every backend follows it)::

        backend = BackendClass(settings: HandlerSettings, store: handler.store.JobStore)

    ``handler.backends.load_backend(settings, store)`` is the one lookup that picks the class:
    ``settings.backend`` (``KFP_TRAINER_BACKEND``) if set, else ``settings.mode``, looked up in
    ``handler.backends.BACKENDS`` ({"local": "handler.backends.local:LocalBackend", "remote":
    "handler.remote.backend:RemoteBackend", "noop": "handler.backends.noop:NoopBackend"}); a
    ``"package.module:Class"`` value is imported as given. One instance per ``HandlerService``;
    the constructor must do no network I/O (build clients lazily, on first use).

    What a backend may use of the store (safe across threads and gunicorn worker processes):
    ``store.request(job_uuid) -> dict`` (the job.requested data, model_artifact.uri resolved),
    ``store.backend_state(job_uuid) -> dict`` and ``store.set_backend_state(job_uuid, state)``
    (a small JSON-able dict private to the backend, e.g. a pid or a run id, kept across restarts).

    Optional class attributes the service reads with ``getattr`` (defaults in brackets):
    ``max_concurrent: int | None`` [None]: runs active at once across all workers; None means
    submit every queued job at once (KFP queues them itself). ``poll_interval_s: float | None``
    [None]: how often the owning worker calls ``status()`` for its active jobs; None means only
    when a ``run.finished`` notice or a ``dev.knative.sources.ping`` tick arrives.
    ``describes_jobs: bool`` [False]: the backend is a system of record, so GET /jobs/<id>
    refreshes an active job from ``status()`` and answers from ``status(job_uuid, None)`` for a
    job this replica's store does not know (``run_id`` None there means "no such job"). Such a
    backend also lets the service *re-adopt* a job its store lost (a Knative Service's store is
    container-local): a ``run.finished`` notice or a cancel request naming a job the store does
    not know creates its record from ``status(job_uuid, None)`` and carries on as usual.
    ``list_active() -> list[str]`` [absent]: the job_uuids of runs this deployment started that
    have not ended (remote: the configured experiment's PENDING/RUNNING/PAUSED runs); a
    ``dev.knative.sources.ping`` tick re-adopts those the store does not know, so their end is
    still announced. Only meaningful with ``describes_jobs``.
    ``default_model_store() -> str`` [absent]: where model names resolve when
    KFP_TRAINER_MODEL_STORE is empty.

    States: ``status()`` answers ``JobStatus.scheduled`` while the run waits, ``in_progress``
    while it runs, and a terminal status with ``result`` (pipelines' RunResult dict) and
    ``error`` once it ended. ``cancel()`` only asks; the terminal state comes from ``status()``.
    """

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
