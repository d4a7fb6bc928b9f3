"""Local mode's event logic: one code path from an inbound CloudEvent to a reply.

``LocalService.handle`` is what the Flask view calls for ``POST /`` and what the provider calls
in-process; it meets each event type with one short function below. The store (SQLite) is the
system of record, the queue and the outbox; what runs between requests (claiming and
submitting queued jobs, watching runs, delivering events) is in handler/lifecycle.py, and
turning what the backend reports into job states is in handler/reconcile.py.

Tracing: a ``job.requested`` span continues the event's ``traceparent``; the job keeps that
span's context (``request["trace"]``), so the ``submit`` and ``job ended`` spans join the same
trace, the run gets it as a parameter and every emitted event carries it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage

from handler import contract, ingress, jobstate, logs, metrics, procs
from handler.admission import Admission
from handler.backends import load_backend
from handler.backends.base import Backend
from handler.errors import BadRequest, TooManyRuns, Unavailable, error_reply
from handler.jobstate import JobState, Transitions, now_iso
from handler.lifecycle import Lifecycle
from handler.outbox import Outbox
from handler.reconcile import Reconciler
from handler.reply import Reply, event_reply, json_reply
from handler.services import JobsPage
from handler.settings import HandlerSettings, check_ce_overrides
from handler.store import Job, JobStore, StoreUnavailable, new_job
from pipelines import tracing
from pipelines.pipeline import TRACE_FIELD

__all__ = ["LocalService", "Reply", "create_service"]

log = logs.get("handler.service")
CONSUMER: Final = tracing.trace.SpanKind.CONSUMER


class LocalService:
    """Inbound events in, emitted events out; jobs in the store, runs in the backend."""

    def __init__(self, settings: HandlerSettings, store: JobStore, backend: Backend) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.owner = f"{procs.token()}/{uuid.uuid4().hex[:8]}"
        self.admission = Admission(settings)
        self.outbox = Outbox(settings, store, self.owner)
        self.transitions = Transitions(store, self.emit)
        self.reconciler = Reconciler(settings, store, backend, self.transitions)
        self.lifecycle = Lifecycle(self)
        # Events nobody here needs are born delivered: no sink configured, no subscriber yet.
        store.sink_delivery = bool(settings.sink)
        store.local_delivery = False

    # -- the one inbound path -------------------------------------------------------------------

    def handle(self, message: HTTPMessage, caller: str = "") -> Reply:
        """Answer one inbound event: decode, validate, act, reply. Never raises.

        ``caller``: who sent it, when identity checks are on (handler/identity.py).
        """
        try:
            event = ingress.decode(message, max_body_bytes=self.settings.max_body_bytes)
            match event.type:
                case contract.JOB_REQUESTED:
                    with tracing.span(
                        jobstate.TRACER,
                        "job.requested",
                        parent=event.trace,
                        kind=CONSUMER,
                        attributes={"job_uuid": event.data["job_uuid"]},
                    ):
                        return self.requested(event.data, caller)
                case contract.JOB_CANCEL_REQUESTED:
                    return self.cancel_requested(event.data["job_uuid"])
                case contract.RUN_FINISHED:
                    return self.run_finished(event.data["job_uuid"])
                case _:
                    return self.ping()
        except Exception as exc:
            return error_reply(exc, retry_after_s=self.settings.retry_after_s)

    def requested(self, data: dict[str, Any], caller: str = "") -> Reply:
        """Queue a new job (200 + job.scheduled, committed first); a redelivery gets the same.

        :raises TooManyRuns: ``caller`` has ``max_active_runs`` unfinished jobs already.
        """
        job_uuid = data["job_uuid"]
        digest = ingress.digest(data)
        try:
            request = self.admission.admit(data)
            if not self.lifecycle.backend_ready():
                raise Unavailable(f"the {self.backend.name} backend is not ready; retry later")
        except (BadRequest, Unavailable):
            # A redelivery is answered as the first delivery was, whatever changed since (a
            # dataset moved, the backend down); only a new job is refused. The store is read
            # here, on the way out, so an accepted request costs one write and no read.
            existing = self.store.job(job_uuid)
            if existing is None:
                raise
            return self._redelivered(existing, digest)
        if trace := tracing.carrier():
            request = {**request, TRACE_FIELD: trace}
        fresh = new_job(
            job_uuid=job_uuid,
            digest=digest,
            request=request,
            scheduled_at=now_iso(),
            caller=caller or None,
        )
        event = self.event(contract.JOB_SCHEDULED, fresh)
        limit = self.settings.auth.max_active_runs
        job, created = self.store.insert_job(fresh, event, max_active=limit)
        if job is None:
            log.info("caller at its limit", extra={"caller": caller, "limit": limit})
            raise TooManyRuns(caller, limit)
        if not created:
            return self._redelivered(job, digest)
        counted(contract.JOB_SCHEDULED)
        log.info("job queued", extra={"job_uuid": job_uuid, "model": data["model"]})
        self.lifecycle.queued()
        return event_reply(event)

    def cancel_requested(self, job_uuid: str) -> Reply:
        """Drop a queued job, or ask the backend to stop a running one (202 either way)."""
        job = self.store.job(job_uuid)
        if job is None:
            raise BadRequest(f"unknown job {job_uuid!r}: nothing to cancel")
        if job.state in (JobState.completed, JobState.failed):
            raise BadRequest(f"job {job_uuid!r} already {job.state}: nothing to cancel")
        if job.state == JobState.cancelled:
            return json_reply(202, {"job_uuid": job_uuid, "status": "cancelled"})
        if self.transitions.drop(job_uuid) is not None:
            log.info("queued job cancelled", extra={"job_uuid": job_uuid})
            self.lifecycle.emitted()
            return json_reply(202, {"job_uuid": job_uuid, "status": "cancelled"})
        flagged = self.transitions.ask_to_cancel(job_uuid)
        if flagged is None:  # it ended in the meantime: answer from its final state
            return self.cancel_requested(job_uuid)
        if flagged.run_id:
            ended = self.reconciler.cancel(flagged)
            if ended is not None and ended.terminal:
                self.lifecycle.emitted()
                return json_reply(202, {"job_uuid": job_uuid, "status": ended.status.value})
        log.info("cancel requested", extra={"job_uuid": job_uuid, "run_id": flagged.run_id})
        self.lifecycle.wake()
        return json_reply(202, {"job_uuid": job_uuid, "status": "cancelling"})

    def run_finished(self, job_uuid: str) -> Reply:
        """A hint that the run ended: ask the backend now instead of at the next poll."""
        job = self.store.job(job_uuid)
        if job is None:
            raise BadRequest(f"unknown job {job_uuid!r}: no run to reconcile")
        if job.state == JobState.running:
            job = self.reconciler.refresh(job) or job
            self.lifecycle.emitted()
        return json_reply(202, {"job_uuid": job_uuid, "status": job.status.value})

    def ping(self) -> Reply:
        """The reconcile tick: take over orphaned jobs and ask the backend about running ones."""
        self.lifecycle.take_over_orphans()
        count = self.reconciler.refresh_running()
        self.lifecycle.emitted()
        return json_reply(202, {"reconciled": count})

    # -- queries --------------------------------------------------------------------------------

    def job(self, job_uuid: str) -> dict[str, Any] | None:
        """A job's status (job.status.json shape), or None."""
        job = self.store.job(job_uuid)
        return job.to_status() if job else None

    def jobs(self, page_token: str = "", page_size: int = 50) -> JobsPage:
        """Jobs oldest first; the token is the last sequence number of the previous page."""
        if page_token and not page_token.isdigit():
            raise BadRequest(f"page_token {page_token!r} is not one this handler gave out")
        page = self.store.page(int(page_token or 0), page_size + 1)
        more = len(page) > page_size
        page = page[:page_size]
        token = str(page[-1].seq) if more and page else ""
        return JobsPage([j.to_status() for j in page], token)

    def readiness(self) -> dict[str, str]:
        """Problems keyed by component; empty when ready (backs /readyz)."""
        problems: dict[str, str] = {}
        try:
            self.store.ping()
        except StoreUnavailable as exc:
            log.warning("store not ready", extra={"problem": str(exc)})
            problems["store"] = "the job store cannot be read"
        try:
            if not self.backend.ready():
                problems["backend"] = f"the {self.backend.name} backend is not ready"
        except Exception:
            log.exception("backend readiness check failed")
            problems["backend"] = f"the {self.backend.name} backend is not ready"
        return problems

    # -- lifecycle (handler/lifecycle.py) -------------------------------------------------------

    def start(self) -> None:
        self.lifecycle.start()

    def start_once(self) -> None:
        self.lifecycle.start_once()

    @property
    def started(self) -> bool:
        return self.lifecycle.started

    def stop(self, timeout: float = 10.0) -> None:
        self.lifecycle.stop(timeout)

    def subscribe(self, callback: Callable[[BaseCloudEvent], None]) -> None:
        """Deliver every emitted event to ``callback`` in this process (local mode).

        Subscribe before the first ``handle()``/``start()``: events emitted while nobody here
        subscribes are not kept for later subscribers.
        """
        self.store.local_delivery = True
        self.outbox.subscribe(callback)

    def publish(self, event: BaseCloudEvent) -> None:
        """Emit an event about a job this handler never ran, through the outbox like its own.

        The provider ends a job whose datasets never finished staging (so no ``job.requested``
        reached this handler) and announces it here, to the same sink and subscribers.
        """
        self.store.add_event(event)
        self.lifecycle.emitted()

    # -- building answers -----------------------------------------------------------------------

    def emit(self, event_type: str, job: Job, seq: int | None = None) -> BaseCloudEvent:
        """:meth:`event`, for a change the store commits with it (counted as emitted)."""
        counted(event_type)
        return self.event(event_type, job, seq)

    def event(self, event_type: str, job: Job, seq: int | None = None) -> BaseCloudEvent:
        """An emitted event about ``job``: its status as data, the contract's id, and the
        active span's trace context, else the job's."""
        trace = tracing.carrier() or job.request.get(TRACE_FIELD) or {}
        time_ = None
        if event_type == contract.JOB_SCHEDULED:
            time_ = datetime.fromisoformat(job.scheduled_at.replace("Z", "+00:00"))
        return contract.make_event(
            event_type,
            self.settings.source,
            job.to_status(),
            seq=seq,
            time=time_,
            extensions={**self.settings.ce_overrides, **trace},
        )

    def _redelivered(self, job: Job, digest: str) -> Reply:
        if job.digest != digest:
            raise BadRequest(
                f"job_uuid {job.job_uuid!r} was already requested with different content; "
                "a changed request needs a new job_uuid"
            )
        log.info("redelivered request answered again", extra={"job_uuid": job.job_uuid})
        stored = self.store.scheduled_event(job.job_uuid)
        if stored is None:  # cannot happen: the job and its event are one row
            raise StoreUnavailable(f"job {job.job_uuid} has no job.scheduled event")
        return event_reply(contract.event_from_dict(stored))


def counted(event_type: str) -> None:
    """Count an emitted event; a terminal one also counts the job as ended in its state."""
    metrics.EVENTS_EMITTED.labels(metrics.event_label(event_type)).inc()
    if event_type in contract.TERMINAL_TYPES:
        metrics.JOBS_ENDED.labels(event_type.rsplit(".", 1)[-1]).inc()


def create_service(settings: HandlerSettings) -> LocalService:
    """Build the store, the backend (by the one lookup) and the service; starts nothing."""
    check_ce_overrides(settings.ce_overrides)
    store = JobStore(
        settings.database, busy_timeout_s=settings.db_busy_timeout_s, sync=settings.db_sync
    )
    backend = load_backend(settings, store)
    return LocalService(settings, store, backend)
