"""Remote mode's event logic: every answer is a function of the event and of what KFP and S3 say.

No store, no threads, no outbox: the Broker is the outbox. Each event gets one answer the
Broker acts on: ``200`` with a reply event (routed back in, so it reaches the Triggers), ``202``
with JSON (nothing to route), ``400`` (dead-lettered: it can never succeed) or ``503`` with
``Retry-After`` (redelivered with backoff: KFP or S3 is not there right now). Replies carry the
contract's deterministic ids, so an answer given twice is one fact to a consumer that dedupes
by ``source`` + ``id`` (docs/events.md).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Final

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage

from handler import contract, ingress, logs, metrics
from handler.admission import Admission
from handler.backends.base import RunState
from handler.contract import JobStatus
from handler.errors import BadRequest, TooManyRuns, error_reply
from handler.remote import reconcile, s3
from handler.remote.outcome import Notice, kfp_time
from handler.remote.runs import KfpRuns, request_digest, run_trace
from handler.reply import Reply, event_reply, json_reply
from handler.services import JobsPage
from handler.settings import HandlerSettings, check_ce_overrides
from handler.sink import SinkClient
from pipelines import tracing
from pipelines.pipeline import TRACE_FIELD

log = logs.get("handler.remote.service")

CANCEL_POLL_S: Final = 0.5
TRACER: Final = "handler"


class RemoteService:
    """Answers events for remote mode (see the module docstring). Built per app; no I/O yet."""

    def __init__(self, settings: HandlerSettings, runs: KfpRuns | None = None) -> None:
        check_ce_overrides(settings.ce_overrides)
        self.settings = settings
        self.runs = runs or KfpRuns(settings)
        self.admission = Admission(settings, default_model_store=s3.model_store(settings.remote))
        self.sink = SinkClient(settings.sink, settings.sink_token_path) if settings.sink else None

    # -- the one inbound path -------------------------------------------------------------------

    def handle(self, message: HTTPMessage, caller: str = "") -> Reply:
        """Answer one inbound event: decode, validate, act, reply. Never raises.

        ``caller``: who sent it, when identity checks are on (handler/identity.py).
        """
        try:
            event = ingress.decode(message, max_body_bytes=self.settings.max_body_bytes)
            match event.type:
                case contract.JOB_REQUESTED:
                    with self.job_span("job.requested", event.data["job_uuid"], event.trace):
                        return self.requested(event.data, caller)
                case contract.JOB_CANCEL_REQUESTED:
                    return self.cancel_requested(event.data, event.trace)
                case contract.RUN_FINISHED:
                    return self.run_finished(event.data, event.trace)
                case _:
                    return self.ping()
        except Exception as exc:
            return error_reply(exc, retry_after_s=self.settings.retry_after_s)

    def requested(self, data: dict[str, Any], caller: str = "") -> Reply:
        """200 + job.scheduled once a KFP run for the job exists; the same for a redelivery.

        A new job of a ``caller`` that has ``max_active_runs`` unfinished runs already (counted
        from KFP, by the run's ``caller`` parameter) is a 429: Knative redelivers it later.
        """
        job_uuid = data["job_uuid"]
        digest = ingress.digest(data)
        self.admission.check(data)
        run = self.runs.find(job_uuid)
        if run is None:
            limit = self.settings.auth.max_active_runs
            if caller and limit and self.runs.active_for(caller) >= limit:
                log.info("caller at its limit", extra={"caller": caller, "limit": limit})
                raise TooManyRuns(caller, limit)
            request = self.admission.resolve(data)
            if trace := tracing.carrier():  # the run's tasks continue this trace
                request = {**request, TRACE_FIELD: trace}
            run, created = self.runs.create(request, digest, look_first=False, caller=caller)
            if created:
                metrics.JOBS_SUBMITTED.inc()
                log.info("job scheduled", extra={"job_uuid": job_uuid, "run_id": run.run_id})
                return event_reply(self._scheduled(run))
        return self._redelivered(run, digest)

    def cancel_requested(self, data: dict[str, Any], trace: dict[str, str] | None = None) -> Reply:
        """Terminate the run; 200 + the terminal event once KFP says it ended (a run that had
        finished training is completed), else 202 ``cancelling``: the notice or the reconcile
        tick announces the end. The span joins the job's trace (the run's), else ``trace``."""
        job_uuid = data["job_uuid"]
        run = self.runs.find(job_uuid)
        if run is None:
            raise BadRequest(f"unknown job {job_uuid!r}: KFP has no run for it; nothing to cancel")
        with self.job_span("job.cancel_requested", job_uuid, run_trace(run) or trace):
            state = self.runs.state(run)
            if not state.status.terminal:
                self.runs.terminate(run)
                log.info("cancel requested", extra={"job_uuid": job_uuid, "run_id": run.run_id})
                state = self._await_end(run)
            if state.status.terminal:
                return self._ended(job_uuid, state)
            return json_reply(202, {"job_uuid": job_uuid, "status": "cancelling"})

    def run_finished(self, data: dict[str, Any], trace: dict[str, str] | None = None) -> Reply:
        """The exit task's notice: 200 + the job's terminal event, read from KFP and S3. The
        span continues the notice's trace (``trace``), else the run's."""
        job_uuid = data["job_uuid"]
        notice = Notice.from_data(data)
        run = self.runs.find(job_uuid)
        if run is None:
            raise BadRequest(f"unknown job {job_uuid!r}: KFP has no run for it; no run to read")
        with self.job_span("run.finished", job_uuid, trace or run_trace(run)):
            if notice.run_id and notice.run_id != run.run_id:
                log.info(
                    "notice from a duplicate run ignored",
                    extra={"job_uuid": job_uuid, "run_id": notice.run_id, "kept": run.run_id},
                )
                return json_reply(202, {"job_uuid": job_uuid, "ignored": notice.run_id})
            state = self.runs.state(run, notice)
            if state.status.terminal:
                return self._ended(job_uuid, state)
            return json_reply(202, {"job_uuid": job_uuid, "status": state.status.value})

    def ping(self) -> Reply:
        """The reconcile tick: re-emit the terminal event of every run that ended lately."""
        if self.sink is None:
            return json_reply(202, {"reconciled": 0, "emitted": 0})
        done = reconcile.tick(self, self.sink, self.settings.reconcile_period_s)
        body = {"reconciled": done.reconciled, "emitted": done.emitted}
        if done.failed:
            body["not_delivered"] = done.failed
            return json_reply(503, body, {"Retry-After": str(self.settings.retry_after_s)})
        return json_reply(202, body)

    # -- queries --------------------------------------------------------------------------------

    def job(self, job_uuid: str) -> dict[str, Any] | None:
        """The job's status from KFP and S3; None only when KFP says there is no such run.

        :raises BackendUnavailable: KFP or S3 cannot be read (503, never a 404).
        """
        run = self.runs.find(job_uuid)
        return None if run is None else self.status(job_uuid, self.runs.state(run))

    def jobs(self, page_token: str = "", page_size: int = 50) -> JobsPage:
        runs, token = self.runs.page(page_token, page_size)
        return JobsPage([self.status(r.display_name, self.runs.state(r)) for r in runs], token)

    def readiness(self) -> dict[str, str]:
        """Always ready while the process answers: a KFP outage must reach the Broker as 503s
        (which it retries), not take the pod out of rotation."""
        return {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start_once(self) -> None:
        """Warm up what the first request would otherwise pay for (compiling the pipeline)."""
        try:
            self.runs.pipeline_spec_json()
        except Exception:  # a bad pipeline setting shows on the first request, named there
            log.exception("compiling the pipeline failed")

    def stop(self, timeout: float = 10.0) -> None:
        self.runs.kfp.close()
        if self.sink is not None:
            self.sink.close()

    # -- building answers -----------------------------------------------------------------------

    def _await_end(self, run: Any) -> RunState:
        """Poll the run until KFP says it ended, for at most ``cancel_wait_s``."""
        deadline = time.monotonic() + self.settings.cancel_wait_s
        while True:
            state = self.runs.state(self.runs.get(run.run_id) or run)
            if state.status.terminal or time.monotonic() >= deadline:
                return state
            time.sleep(CANCEL_POLL_S)

    def _redelivered(self, run: Any, digest: str) -> Reply:
        stored = request_digest(run)
        if stored is not None and stored != digest:
            raise BadRequest(
                f"job_uuid {run.display_name!r} was already requested with different content; "
                "a changed request needs a new job_uuid"
            )
        log.info("redelivered request answered again", extra={"job_uuid": run.display_name})
        return event_reply(self._scheduled(run))

    def _scheduled(self, run: Any) -> BaseCloudEvent:
        """The job.scheduled reply, the same bytes every time: it is made of the run alone."""
        created = _utc(run.created_at)
        data = contract.status_data(
            run.display_name,
            JobStatus.scheduled,
            run_id=run.run_id,
            scheduled_at=contract.timestamp(created),
        )
        return self._event(contract.JOB_SCHEDULED, data, created)

    def status(self, job_uuid: str, state: RunState) -> dict[str, Any]:
        return contract.status_data(
            job_uuid,
            state.status,
            run_id=state.run_id,
            scheduled_at=contract.timestamp(state.scheduled_at),
            started_at=contract.timestamp(state.started_at),
            completed_at=contract.timestamp(state.completed_at),
            progress=contract.progress_fields(state.progress),
            result=state.result,
            error=state.error,
        )

    def terminal_event(self, job_uuid: str, state: RunState) -> BaseCloudEvent:
        data = self.status(job_uuid, state)
        if data["completed_at"] is None:
            data["completed_at"] = contract.timestamp(datetime.now(UTC))
        return self._event(contract.STATUS_EVENT_TYPE[state.status], data, state.completed_at)

    def _ended(self, job_uuid: str, state: RunState) -> Reply:
        """200 + the terminal event, counting the job as ended (the reconcile tick's repeats of
        it are not counted: they announce an end already answered here, or about to be)."""
        event = self.terminal_event(job_uuid, state)
        metrics.JOBS_ENDED.labels(state.status.value).inc()
        return event_reply(event)

    def _event(self, event_type: str, data: dict[str, Any], at: datetime | None) -> BaseCloudEvent:
        """An event this handler answers or emits, with the active span's trace context."""
        metrics.EVENTS_EMITTED.labels(metrics.event_label(event_type)).inc()
        return contract.make_event(
            event_type,
            self.settings.source,
            data,
            time=at,
            extensions={**self.settings.ce_overrides, **tracing.carrier()},
        )

    @staticmethod
    def job_span(name: str, job_uuid: str, parent: dict[str, str] | None) -> Any:
        """A span continuing ``parent`` (an event's or a run's trace context): the events
        answered or emitted inside it carry the job's trace."""
        return tracing.span(
            TRACER,
            name,
            parent=parent,
            kind=tracing.trace.SpanKind.CONSUMER,
            attributes={"job_uuid": job_uuid},
        )


def _utc(value: Any) -> datetime | None:
    moment = kfp_time(value)
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment
