"""The handler's event logic: one code path from an inbound CloudEvent to a reply.

``HandlerService.handle`` is what the Flask view calls for ``POST /`` and what the provider calls
in-process; nothing else decides what an event means. Two background threads per service do
the slow parts: the dispatcher claims queued jobs in order and submits them to the backend,
watches the runs it owns and records their end; the outbox loop delivers emitted events.

Job life: ``queued`` -> ``starting`` (claimed, submit in flight) -> ``running`` -> ``completed``
| ``failed`` | ``cancelled``. Each change and the event announcing it are one store transaction;
docs/events.md says which event goes where.

Tracing: a ``job.requested`` span continues the event's ``traceparent``; the job keeps that
span's context (``request["trace"]``), so the ``submit`` and ``job ended`` spans join the same
trace, the run gets it as a parameter and every emitted event carries it.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage

from handler import contract, ingress, logs, metrics, procs
from handler.backends import load_backend
from handler.backends.base import Backend, BackendRejected, BackendUnavailable, RunState
from handler.contract import JobStatus
from handler.errors import BadRequest, Unavailable, error_reply
from handler.outbox import Outbox
from handler.reply import Reply, event_reply, json_reply
from handler.roots import allowed_roots
from handler.settings import HandlerSettings, SettingsError
from handler.store import (
    ACTIVE,
    QUEUED,
    RUNNING,
    STARTING,
    Job,
    JobStore,
    StoreUnavailable,
    new_job,
)
from pipelines import tracing
from pipelines.pipeline import TRACE_FIELD

__all__ = ["HandlerService", "Reply", "create_service"]

log = logs.get("handler.service")
TRACER: Final = "handler"
CONSUMER: Final = tracing.trace.SpanKind.CONSUMER

TICK_S: Final = 0.5  # how often a worker looks for work queued by other workers
ADOPT_EVERY_S: Final = 2.0
CANCEL_RESEND_S: Final = 5.0
READY_CACHE_S: Final = 1.0
# How long a model name's resolved artifact is reused (a lookup may be an S3 round trip). Only
# hits are kept: a model uploaded after a miss is found by the next request.
MODEL_CACHE_S: Final = 10.0
_EXTENSION_NAME: Final = re.compile(r"^[a-z0-9]{1,20}$")
_PROGRESS_KEYS: Final = {"step": int, "total_steps": int, "epoch": int, "loss": (int, float)}
# The digest of a job re-adopted from the backend: its request content is not known here.
ADOPTED_DIGEST: Final = ""


def now_iso() -> str:
    """UTC now as RFC 3339 with a Z, millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _progress(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep the contract's progress fields, dropping anything mistyped."""
    if not raw:
        return None
    out = {
        k: raw[k]
        for k, kind in _PROGRESS_KEYS.items()
        if isinstance(raw.get(k), kind) and not isinstance(raw.get(k), bool)
    }
    return out or None


def _owner_alive(owner: str | None) -> bool:
    return owner is not None and procs.alive(owner.split("/", 1)[0])


class HandlerService:
    """Inbound events in, emitted events out; jobs in the store, runs in the backend."""

    def __init__(self, settings: HandlerSettings, store: JobStore, backend: Backend) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.owner = f"{procs.token()}/{uuid.uuid4().hex[:8]}"
        self.outbox = Outbox(settings, store, self.owner)
        # Events nobody here needs are born delivered: no sink configured, no subscriber yet.
        store.sink_delivery = bool(settings.sink)
        store.local_delivery = False
        self._limit: int | None = getattr(backend, "max_concurrent", None)
        self._poll_s: float | None = getattr(backend, "poll_interval_s", None)
        self._stop = threading.Event()
        self._wake_dispatch = threading.Event()
        self._wake_outbox = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._cancel_sent: dict[str, float] = {}
        self._ready_until = 0.0
        self._models: dict[str, tuple[float, str]] = {}  # model -> (until, artifact uri)
        default_store = getattr(backend, "default_model_store", None)
        self.roots = allowed_roots(settings, default_store() if default_store else "")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher and outbox threads (idempotent; call subscribe() first)."""
        with self._lock:
            if self._threads:
                return
            self._stop.clear()
            for name, target in (("dispatch", self._dispatch_loop), ("outbox", self._outbox_loop)):
                thread = threading.Thread(target=target, name=f"kfp-trainer-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        log.info(
            "handler service started",
            extra={"owner": self.owner, "backend": self.backend.name, "db": str(self.store.path)},
        )

    def start_once(self) -> None:
        """Start unless started or stopped: the lazy start on a worker's first request."""
        if not self._threads and not self._stop.is_set():
            self.start()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads, give running jobs back for adoption, flush nothing in flight.

        Running local trainings keep running in their own sessions; the next service (this
        deployment's other worker, or the handler after a restart) adopts them.
        """
        with self._lock:
            threads, self._threads = self._threads, []
        self._stop.set()
        self._wake_dispatch.set()
        self._wake_outbox.set()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.store.release(self.owner)
        except StoreUnavailable as exc:
            log.warning("could not release jobs on stop", extra={"problem": str(exc)})
        self.outbox.close()
        if threads:
            log.info("handler service stopped", extra={"owner": self.owner})

    def subscribe(self, callback: Callable[[BaseCloudEvent], None]) -> None:
        """Deliver every emitted event to ``callback`` in this process (local mode).

        Subscribe before the first ``handle()``/``start()``: events emitted while nobody here
        subscribes are not kept for later subscribers.
        """
        self.store.local_delivery = True
        self.outbox.subscribe(callback)

    # -- queries ---------------------------------------------------------------------------------

    def job(self, job_uuid: str) -> dict[str, Any] | None:
        """A job's status (job.status.json shape), or None.

        With a backend that ``describes_jobs`` (remote: KFP is the system of record), an
        active job is refreshed from the backend first (reaching a terminal state emits its
        event, as a reconcile would), and a job this replica's store does not know is answered
        from the backend alone.
        """
        job = self.store.job(job_uuid)
        if not getattr(self.backend, "describes_jobs", False):
            return job.to_status() if job else None
        try:
            if job is None:
                return self._describe(job_uuid)
            if job.state == RUNNING:
                job = self._apply(job, self.backend.status(job_uuid, job.run_id)) or job
        except BackendUnavailable as exc:
            log.warning(
                "backend unavailable; answering from the store", extra={"problem": str(exc)}
            )
        return job.to_status() if job else None

    def _describe(self, job_uuid: str) -> dict[str, Any] | None:
        state = self.backend.status(job_uuid, None)
        if state.run_id is None:
            return None
        result = state.result or {}
        return {
            "job_uuid": job_uuid,
            "status": state.status.value,
            "run_id": state.run_id,
            "scheduled_at": None,
            "started_at": _iso(state.started_at),
            "completed_at": _iso(state.completed_at),
            "progress": _progress(state.progress),
            "checkpoints": list(result.get("checkpoints") or []),
            "resources_allocated": result.get("resources_allocated"),
            "dataset_rows": result.get("dataset_rows"),
            "rows_without_trainable_tokens": result.get("rows_without_trainable_tokens"),
            "error": state.error,
        }

    def jobs(self) -> list[dict[str, Any]]:
        return [j.to_status() for j in self.store.jobs()]

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

    # -- the one inbound path ----------------------------------------------------------------

    def handle(self, message: HTTPMessage) -> Reply:
        """Answer one inbound event: decode, validate, act, reply. Never raises."""
        try:
            event = ingress.decode(message, max_body_bytes=self.settings.max_body_bytes)
            if event.type == contract.JOB_REQUESTED:
                attributes = {"job_uuid": event.data["job_uuid"]}
                with tracing.span(
                    TRACER,
                    "job.requested",
                    parent=event.trace,
                    kind=CONSUMER,
                    attributes=attributes,
                ):
                    return self._requested(event.data)
            if event.type == contract.JOB_CANCEL_REQUESTED:
                return self._cancel(event.data["job_uuid"])
            if event.type == contract.RUN_FINISHED:
                return self._run_finished(event.data["job_uuid"])
            return self._ping()
        except Exception as exc:
            return error_reply(exc, retry_after_s=self.settings.retry_after_s)

    def _job_span(self, name: str, job: Job, **attributes: Any) -> Any:
        """A span of this job's trace (a child of the span that accepted it)."""
        attributes["job_uuid"] = job.job_uuid
        return tracing.span(
            TRACER, name, parent=job.request.get(TRACE_FIELD), attributes=attributes
        )

    def _emit(self, event_type: str, job: Job, seq: int | None = None) -> BaseCloudEvent:
        """:meth:`_event`, for a change the store commits with it (counted as emitted)."""
        counted(event_type, job)
        return self._event(event_type, job, seq)

    def _event(self, event_type: str, job: Job, seq: int | None = None) -> BaseCloudEvent:
        """An emitted event, carrying the active span's trace context, else the job's."""
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

    def _resolve(self, data: dict[str, Any]) -> dict[str, Any]:
        """The request as it will run: model_artifact.uri filled from the model store."""
        if data.get("model_artifact"):
            return data
        from pipelines.staging import StagingError, resolve_model_uri

        model = data["model"]
        now = time.monotonic()
        cached = self._models.get(model)
        if cached is not None and cached[0] > now:
            return {**data, "model_artifact": {"uri": cached[1]}}
        store = self.settings.model_store
        default_store = getattr(self.backend, "default_model_store", None)
        if not store and default_store is not None:
            store = default_store()
        try:
            uri = resolve_model_uri(model, store)
        except StagingError as exc:  # not there, or the store said no (bucket, access): for good
            raise BadRequest(f"model_artifact: not given and not resolvable: {exc}") from None
        except OSError as exc:  # pipelines' StorageUnavailable is a ConnectionError: not now
            log.warning(
                "model store unavailable",
                extra={"model": data["model"], "model_store": store, "problem": str(exc)},
            )
            raise Unavailable(
                f"model_artifact: not given, and model store {store!r} could not be searched "
                f"for model {data['model']!r} right now; retry later"
            ) from None
        self._models[model] = (now + MODEL_CACHE_S, uri)
        return {**data, "model_artifact": {"uri": uri}}

    def _requested(self, data: dict[str, Any]) -> Reply:
        job_uuid = data["job_uuid"]
        digest = ingress.digest(data)
        try:
            request = self._admit(data)
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
        fresh = new_job(job_uuid=job_uuid, digest=digest, request=request, scheduled_at=now_iso())
        event = self._event(contract.JOB_SCHEDULED, fresh)
        job, created = self.store.insert_job(fresh, event)
        if not created:
            return self._redelivered(job, digest)
        counted(contract.JOB_SCHEDULED, job)
        log.info("job queued", extra={"job_uuid": job_uuid, "model": data["model"]})
        if self._limit != 0:  # a backend that starts nothing (hold) has no dispatcher work
            self._wake_dispatch.set()
        if not self.store.born_delivered(reply=True):  # it travels as the reply, maybe no more
            self._wake_outbox.set()
        return event_reply(event)

    def _admit(self, data: dict[str, Any]) -> dict[str, Any]:
        """Check a new request against what the pipeline accepts and resolve its model.

        :raises BadRequest: a problem with the request (every one found, named).
        :raises Unavailable: the backend or the model store cannot take it right now.
        """
        from pipelines.validation import check_request

        outside = self.roots.request_problems(data)  # first: nothing outside them is looked at
        if outside:
            raise BadRequest(outside)
        problems = check_request(data)
        if problems:
            raise BadRequest(problems)
        request = self._resolve(data)
        if not self._backend_ready():
            raise Unavailable(f"the {self.backend.name} backend is not ready; retry later")
        return request

    def _emitted(self) -> None:
        """An event was just emitted: wake the delivery loop, unless nobody needs it delivered."""
        if not self.store.born_delivered():
            self._wake_outbox.set()

    def _backend_ready(self) -> bool:
        """``backend.ready()``, remembered for a second when true (it may cost a round trip)."""
        now = time.monotonic()
        if now < self._ready_until:
            return True
        ready = bool(self.backend.ready())
        self._ready_until = now + READY_CACHE_S if ready else 0.0
        return ready

    def _redelivered(self, job: Job, digest: str) -> Reply:
        if job.digest != digest and job.digest != ADOPTED_DIGEST:
            raise BadRequest(
                f"job_uuid {job.job_uuid!r} was already requested with different content; "
                "a changed request needs a new job_uuid"
            )
        log.info("redelivered request answered again", extra={"job_uuid": job.job_uuid})
        return self._scheduled_reply(job)

    def _scheduled_reply(self, job: Job) -> Reply:
        stored = self.store.scheduled_event(job.job_uuid)
        if stored is None:  # cannot happen: the job and its event are one row
            raise StoreUnavailable(f"job {job.job_uuid} has no job.scheduled event")
        return event_reply(contract.event_from_dict(stored))

    def _cancel(self, job_uuid: str) -> Reply:
        job = self.store.job(job_uuid) or self._adopt(job_uuid)
        if job is None:
            raise self._unknown(job_uuid, "nothing to cancel")
        if job.state in ("completed", "failed"):
            raise BadRequest(f"job {job_uuid!r} already {job.state}: nothing to cancel")
        if job.state == "cancelled":
            return json_reply(202, {"job_uuid": job_uuid, "status": "cancelled"})
        dropped = self.store.update(
            job_uuid,
            when=lambda j: j.state == QUEUED,
            change=lambda j: {
                "state": "cancelled",
                "cancel_requested": 1,
                "completed_at": now_iso(),
            },
            emit=lambda j: self._emit(contract.JOB_CANCELLED, j),
        )
        if dropped is not None:
            log.info("queued job cancelled", extra={"job_uuid": job_uuid})
            self._emitted()
            return json_reply(202, {"job_uuid": job_uuid, "status": "cancelled"})
        flagged = self.store.update(
            job_uuid, when=lambda j: j.state in ACTIVE, change=lambda j: {"cancel_requested": 1}
        )
        if flagged is None:  # it ended in the meantime: answer from its final state
            return self._cancel(job_uuid)
        if flagged.run_id:
            self.backend.cancel(job_uuid, flagged.run_id)
            self._cancel_sent[job_uuid] = time.monotonic()
            # A backend that reports the cancel at once (KFP: CANCELING) ends the job now,
            # not at the next poll or ping.
            ended = self._apply(flagged, self.backend.status(job_uuid, flagged.run_id))
            if ended is not None and ended.terminal:
                return json_reply(202, {"job_uuid": job_uuid, "status": ended.status.value})
        log.info("cancel requested", extra={"job_uuid": job_uuid, "run_id": flagged.run_id})
        self._wake_dispatch.set()
        return json_reply(202, {"job_uuid": job_uuid, "status": "cancelling"})

    def _run_finished(self, job_uuid: str) -> Reply:
        job = self.store.job(job_uuid)
        if job is None:
            job = self._adopt(job_uuid)  # applies what the backend says
            if job is None:
                raise self._unknown(job_uuid, "no run to reconcile")
        elif not job.terminal and job.state == RUNNING:
            job = self._apply(job, self.backend.status(job_uuid, job.run_id)) or job
        return json_reply(202, {"job_uuid": job_uuid, "status": job.status.value})

    def _ping(self) -> Reply:
        self._adopt_orphans()
        adopted = self._adopt_active_runs()
        count = 0
        for job in self.store.jobs((RUNNING,)):
            if job.job_uuid not in (adopted or ()):  # adopted ones were just read
                self._apply(job, self.backend.status(job.job_uuid, job.run_id))
            count += 1
        body: dict[str, Any] = {"reconciled": count}
        if adopted is not None:
            body["adopted"] = len(adopted)
        return json_reply(202, body)

    # -- re-adopting jobs the store lost (backends that are a system of record) -----------------

    def _unknown(self, job_uuid: str, what: str) -> BadRequest:
        if getattr(self.backend, "describes_jobs", False):
            return BadRequest(
                f"unknown job {job_uuid!r}: neither the job store nor the {self.backend.name} "
                f"backend has it; {what}"
            )
        return BadRequest(f"unknown job {job_uuid!r}: {what}")

    def _adopt(self, job_uuid: str) -> Job | None:
        """Take over a job the store does not know but the backend runs (or ran).

        In remote mode KFP (plus the result manifest) is the system of record and the store is
        container-local, so a restart or another replica loses jobs that still run. Their record
        is made from what the backend says (run id, times; the request content is not known),
        then that state is applied: a run that ended emits its terminal event now, once (the
        event id is deterministic and the store keeps it). None: the backend has no such run,
        or it is not a system of record.
        """
        if not getattr(self.backend, "describes_jobs", False):
            return None
        state = self.backend.status(job_uuid, None)
        if state.run_id is None:
            return None
        scheduled = _iso(state.scheduled_at) or _iso(state.started_at) or now_iso()
        queued = new_job(
            job_uuid=job_uuid,
            digest=ADOPTED_DIGEST,
            request={"job_uuid": job_uuid},
            scheduled_at=scheduled,
        )
        running = replace(
            queued,
            state=RUNNING,
            run_id=state.run_id,
            owner=self.owner,
            started_at=_iso(state.started_at) or scheduled,
        )
        job, created = self.store.insert_adopted(
            running, self._event(contract.JOB_SCHEDULED, queued)
        )
        if created:
            counted(contract.JOB_SCHEDULED, job)
            log.info(
                "adopted job from the backend",
                extra={"job_uuid": job_uuid, "run_id": state.run_id, "status": state.status.value},
            )
        if not job.terminal:
            self._apply(job, state)
        return self.store.job(job_uuid) or job

    def _adopt_active_runs(self) -> set[str] | None:
        """Adopt the backend's unfinished runs the store lacks (None: it cannot list them)."""
        list_active = getattr(self.backend, "list_active", None)
        if list_active is None or not getattr(self.backend, "describes_jobs", False):
            return None
        adopted: set[str] = set()
        for job_uuid in list_active():
            if self.store.job(job_uuid) is None and self._adopt(job_uuid) is not None:
                adopted.add(job_uuid)
        return adopted

    # -- applying what the backend says ------------------------------------------------------

    def _terminal_fields(self, job: Job, state: RunState) -> tuple[JobStatus, dict[str, Any]]:
        status = state.status
        if job.cancel_requested and status == JobStatus.failed:
            status = JobStatus.cancelled
        fields: dict[str, Any] = {
            "state": status.value,
            "completed_at": _iso(state.completed_at) or now_iso(),
            "run_id": state.run_id or job.run_id,
            "result": dict(state.result or {}),
            "error": None if status == JobStatus.completed else (state.error or None),
            "progress": _progress(state.progress) or job.progress,
        }
        if status == JobStatus.failed and not fields["error"]:
            fields["error"] = "the run failed without saying why"
        candidate = {**job.to_status(), **fields, "status": status.value}
        candidate.update(
            checkpoints=list(fields["result"].get("checkpoints") or []),
            resources_allocated=fields["result"].get("resources_allocated"),
            dataset_rows=fields["result"].get("dataset_rows"),
            rows_without_trainable_tokens=fields["result"].get("rows_without_trainable_tokens"),
        )
        candidate.pop("state")
        candidate.pop("result")
        try:
            contract.validate_data(contract.STATUS_EVENT_TYPE[status], candidate)
        except contract.ContractError as exc:
            log.error("run result breaks the event contract", extra={"job_uuid": job.job_uuid})
            status = JobStatus.failed
            fields.update(
                state="failed",
                result={},
                error=f"the run ended but its result does not fit the event contract: {exc}",
            )
        return status, fields

    def _apply(self, job: Job, state: RunState) -> Job | None:
        """Record what the backend reported; emit the terminal or (throttled) progress event."""
        if state.status.terminal:
            with self._job_span("job ended", job, status=state.status.value):
                return self._end(job, state)
        return self._progressed(job, state)

    def _end(self, job: Job, state: RunState) -> Job | None:
        status, fields = self._terminal_fields(job, state)
        done = self.store.update(
            job.job_uuid,
            when=lambda j: not j.terminal,
            change=lambda j: fields,
            emit=lambda j: self._emit(contract.STATUS_EVENT_TYPE[status], j),
        )
        if done is not None:
            self._cancel_sent.pop(job.job_uuid, None)
            log.info(
                "job ended",
                extra={"job_uuid": job.job_uuid, "status": status.value, "error": done.error},
            )
            self._emitted()
        return done

    def _progressed(self, job: Job, state: RunState) -> Job | None:
        progress = _progress(state.progress)
        if progress is None or progress == job.progress or job.state != RUNNING:
            return None
        step = progress.get("step")
        now = time.time()
        due = (
            isinstance(step, int)
            and step != job.progress_emitted_step
            and (
                job.progress_emitted_at is None
                or now - job.progress_emitted_at >= self.settings.progress_interval_s
            )
        )
        fields: dict[str, Any] = {"progress": progress}
        if due:
            fields.update(progress_emitted_at=now, progress_emitted_step=step)
            self._emitted()
        return self.store.update(
            job.job_uuid,
            when=lambda j: j.state == RUNNING,
            change=lambda j: fields,
            emit=(lambda j: self._emit(contract.JOB_PROGRESS, j, seq=step)) if due else None,
        )

    # -- the dispatcher ------------------------------------------------------------------------

    def _fail(self, job: Job, error: str) -> None:
        self.store.update(
            job.job_uuid,
            when=lambda j: not j.terminal,
            change=lambda j: {"state": "failed", "completed_at": now_iso(), "error": error},
            emit=lambda j: self._emit(contract.JOB_FAILED, j),
        )
        log.warning("job failed to start", extra={"job_uuid": job.job_uuid, "error": error})
        self._emitted()

    def _submit(self, job: Job) -> None:
        """Start the run for a job this worker has claimed (state ``starting``)."""
        with self._job_span("submit", job):
            self._start_run(job)

    def _start_run(self, job: Job) -> None:
        try:
            run_id = self.backend.submit({**job.request, TRACE_FIELD: tracing.carrier()})
        except BackendUnavailable as exc:
            delay = self.outbox.backoff(job.submit_attempts + 1)
            requeued = self.store.update(
                job.job_uuid,
                when=lambda j: j.state == STARTING and j.owner == self.owner,
                change=lambda j: (
                    {"state": "cancelled", "completed_at": now_iso()}
                    if j.cancel_requested
                    else {
                        "state": QUEUED,
                        "owner": None,
                        "submit_attempts": j.submit_attempts + 1,
                        "next_submit_at": time.time() + delay,
                    }
                ),
                emit=lambda j: (
                    self._emit(contract.JOB_CANCELLED, j) if j.state == "cancelled" else None
                ),
            )
            log.warning(
                "backend unavailable; job stays queued",
                extra={"job_uuid": job.job_uuid, "retry_in_s": delay, "problem": str(exc)},
            )
            if requeued is not None and requeued.state == "cancelled":
                self._emitted()
            return
        except BackendRejected as exc:
            self._fail(job, str(exc))
            return
        except Exception as exc:
            log.exception("submit failed", extra={"job_uuid": job.job_uuid})
            self._fail(job, f"the run could not be started: {type(exc).__name__}: {exc}")
            return
        running = self.store.update(
            job.job_uuid,
            when=lambda j: j.state == STARTING and j.owner == self.owner,
            change=lambda j: {"state": RUNNING, "run_id": run_id, "started_at": now_iso()},
            emit=lambda j: self._emit(contract.JOB_STARTED, j),
        )
        if running is None:
            log.warning("job changed hands during submit", extra={"job_uuid": job.job_uuid})
            return
        metrics.JOBS_SUBMITTED.inc()
        log.info("job started", extra={"job_uuid": job.job_uuid, "run_id": run_id})
        self._emitted()
        if running.cancel_requested:
            self.backend.cancel(job.job_uuid, run_id)
            self._cancel_sent[job.job_uuid] = time.monotonic()

    def _submit_queued(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next(self.owner, self._limit, time.time())
            if job is None:
                return
            self._submit(job)

    def _adopt_orphans(self) -> None:
        """Take over active jobs whose worker is gone (crash, restart, graceful stop)."""
        for job in self.store.jobs(ACTIVE):
            if job.owner == self.owner or _owner_alive(job.owner):
                continue
            if not self.store.adopt(job.job_uuid, job.owner, self.owner):
                continue
            log.info("adopted job", extra={"job_uuid": job.job_uuid, "from": job.owner})
            if job.state == STARTING:
                fresh = self.store.job(job.job_uuid)
                if fresh is not None and fresh.state == STARTING:
                    self._submit(fresh)

    def _poll_owned(self) -> None:
        for job in self.store.owned(self.owner):
            if job.state != RUNNING or self._stop.is_set():
                continue
            try:
                if job.cancel_requested:
                    sent = self._cancel_sent.get(job.job_uuid)
                    if sent is None or time.monotonic() - sent >= CANCEL_RESEND_S:
                        self.backend.cancel(job.job_uuid, job.run_id)
                        self._cancel_sent[job.job_uuid] = time.monotonic()
                self._apply(job, self.backend.status(job.job_uuid, job.run_id))
            except BackendUnavailable as exc:
                log.warning(
                    "backend unavailable while polling",
                    extra={"job_uuid": job.job_uuid, "problem": str(exc)},
                )

    def _dispatch_loop(self) -> None:
        next_adopt = 0.0
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_adopt:
                    self._adopt_orphans()
                    next_adopt = now + ADOPT_EVERY_S
                self._submit_queued()
                if self._poll_s is not None and time.monotonic() >= next_poll:
                    self._poll_owned()
                    next_poll = time.monotonic() + self._poll_s
            except StoreUnavailable as exc:
                log.warning("store unavailable in dispatcher", extra={"problem": str(exc)})
            except Exception:
                log.exception("dispatcher iteration failed")
            wait = TICK_S if self._poll_s is None else min(TICK_S, self._poll_s)
            self._wake_dispatch.wait(wait)
            self._wake_dispatch.clear()

    def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            delivered = 0
            try:
                delivered = self.outbox.run_once()
            except StoreUnavailable as exc:
                log.warning("store unavailable in outbox", extra={"problem": str(exc)})
            except Exception:
                log.exception("outbox iteration failed")
            if delivered:
                continue
            self._wake_outbox.wait(TICK_S)
            self._wake_outbox.clear()


def counted(event_type: str, job: Job) -> None:
    """Count an emitted event; a terminal one also counts the job as ended in its state."""
    metrics.EVENTS_EMITTED.labels(metrics.event_label(event_type)).inc()
    if event_type in contract.TERMINAL_TYPES:
        metrics.JOBS_ENDED.labels(event_type.rsplit(".", 1)[-1]).inc()


def _check_overrides(settings: HandlerSettings) -> None:
    bad = [k for k in settings.ce_overrides if not _EXTENSION_NAME.match(k)]
    reserved = {"id", "source", "type", "specversion", "subject", "time", "datacontenttype"}
    bad += [k for k in settings.ce_overrides if k in reserved]
    if bad:
        raise SettingsError(
            f"K_CE_OVERRIDES: {', '.join(sorted(set(bad)))} cannot be extension attribute names "
            "(lower-case letters and digits, at most 20, not a core attribute)"
        )


def create_service(settings: HandlerSettings) -> HandlerService:
    """Build the store, the backend (by the one lookup) and the service; starts nothing."""
    _check_overrides(settings)
    store = JobStore(
        settings.database, busy_timeout_s=settings.db_busy_timeout_s, sync=settings.db_sync
    )
    backend = load_backend(settings, store)
    return HandlerService(settings, store, backend)
