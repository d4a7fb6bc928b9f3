"""A local job's states and the named transitions between them (local mode's SQLite store).

``queued`` -> ``starting`` (a worker claimed it; submit in flight) -> ``running`` ->
``completed`` | ``failed`` | ``cancelled``. Each transition is one store transaction together
with the event that announces it (no event without its state, no state without its event);
:class:`Transitions` is the only code that changes a job's state. The claim itself
(queued -> starting) is :meth:`handler.store.JobStore.claim_next`, one SQL statement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from cloudevents.core.base import BaseCloudEvent

from handler import contract
from handler.contract import JobStatus, now_iso
from pipelines import tracing
from pipelines.pipeline import TRACE_FIELD

if TYPE_CHECKING:
    from handler.store import Job, JobStore

EventFactory = Callable[[str, "Job", int | None], BaseCloudEvent]
TRACER: Final = "handler"


class JobState(StrEnum):
    """Where a stored job is in its life (the ``state`` column)."""

    queued = "queued"
    starting = "starting"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def status(self) -> JobStatus:
        """The contract's status for this state (queued and starting are both scheduled)."""
        match self:
            case JobState.queued | JobState.starting:
                return JobStatus.scheduled
            case JobState.running:
                return JobStatus.in_progress
            case _:
                return JobStatus(self.value)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """A worker owns it: submitting or running."""
        return self in ACTIVE


ACTIVE = (JobState.starting, JobState.running)
TERMINAL = (JobState.completed, JobState.failed, JobState.cancelled)


def job_span(name: str, job: Job, **attributes: Any) -> Any:
    """A span of this job's trace (a child of the span that accepted it)."""
    attributes["job_uuid"] = job.job_uuid
    return tracing.span(TRACER, name, parent=job.request.get(TRACE_FIELD), attributes=attributes)


class Transitions:
    """Every state change of a stored job, each named for what happens.

    Each returns the job as it is afterwards, or None when the job was not in a state the
    transition starts from (someone else got there first: a cancel, another worker).
    """

    def __init__(self, store: JobStore, event: EventFactory) -> None:
        self.store = store
        self.event = event

    def start(self, job: Job, owner: str, run_id: str) -> Job | None:
        """starting -> running: the backend took the run (emits job.started)."""
        return self.store.update(
            job.job_uuid,
            when=lambda j: j.state == JobState.starting and j.owner == owner,
            change=lambda j: {"state": JobState.running, "run_id": run_id, "started_at": now_iso()},
            emit=lambda j: self.event(contract.JOB_STARTED, j, None),
        )

    def requeue(self, job: Job, owner: str, retry_in_s: float) -> Job | None:
        """starting -> queued, to be submitted again in ``retry_in_s`` (the backend was down);
        or -> cancelled, when a cancel arrived meanwhile (emits job.cancelled)."""

        def change(j: Job) -> dict[str, Any]:
            if j.cancel_requested:
                return {"state": JobState.cancelled, "completed_at": now_iso()}
            return {
                "state": JobState.queued,
                "owner": None,
                "submit_attempts": j.submit_attempts + 1,
                "next_submit_at": time.time() + retry_in_s,
            }

        return self.store.update(
            job.job_uuid,
            when=lambda j: j.state == JobState.starting and j.owner == owner,
            change=change,
            emit=lambda j: (
                self.event(contract.JOB_CANCELLED, j, None)
                if j.state == JobState.cancelled
                else None
            ),
        )

    def fail(self, job: Job, error: str) -> Job | None:
        """Any unfinished state -> failed: the run could not start (emits job.failed)."""
        return self.store.update(
            job.job_uuid,
            when=lambda j: not j.terminal,
            change=lambda j: {"state": JobState.failed, "completed_at": now_iso(), "error": error},
            emit=lambda j: self.event(contract.JOB_FAILED, j, None),
        )

    def finish(self, job: Job, status: JobStatus, fields: dict[str, Any]) -> Job | None:
        """Any unfinished state -> completed | failed | cancelled, as the backend reported it
        (emits the terminal event, once)."""
        return self.store.update(
            job.job_uuid,
            when=lambda j: not j.terminal,
            change=lambda j: {**fields, "state": JobState(status.value)},
            emit=lambda j: self.event(contract.STATUS_EVENT_TYPE[status], j, None),
        )

    def drop(self, job_uuid: str) -> Job | None:
        """queued -> cancelled: a cancel before any worker claimed it (emits job.cancelled)."""
        return self.store.update(
            job_uuid,
            when=lambda j: j.state == JobState.queued,
            change=lambda j: {
                "state": JobState.cancelled,
                "cancel_requested": 1,
                "completed_at": now_iso(),
            },
            emit=lambda j: self.event(contract.JOB_CANCELLED, j, None),
        )

    def ask_to_cancel(self, job_uuid: str) -> Job | None:
        """starting | running: mark the cancel; the owner stops the run, the end follows."""
        return self.store.update(
            job_uuid, when=lambda j: j.state.active, change=lambda j: {"cancel_requested": 1}
        )

    def progress(self, job: Job, progress: dict[str, Any], announce_step: int | None) -> Job | None:
        """running -> running with new progress; ``announce_step`` set: emit job.progress for
        that step (the caller throttles)."""
        fields: dict[str, Any] = {"progress": progress}
        if announce_step is not None:
            fields.update(progress_emitted_at=time.time(), progress_emitted_step=announce_step)
        return self.store.update(
            job.job_uuid,
            when=lambda j: j.state == JobState.running,
            change=lambda j: fields,
            emit=(
                (lambda j: self.event(contract.JOB_PROGRESS, j, announce_step))
                if announce_step is not None
                else None
            ),
        )
