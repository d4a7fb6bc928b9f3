"""Local mode: turning what the backend reports into job states, and taking over orphans.

The owning worker polls its running jobs (``poll_owned``); a ``run.finished`` hint or a ping
asks at once (``refresh``, ``ping``). A terminal report finishes the job with its result and
emits the terminal event once; progress is recorded and announced at most once per
``KFP_TRAINER_PROGRESS_INTERVAL_S``, except that a record bringing a new epoch report is
announced at once. A job whose worker is gone (crash, restart, graceful stop)
is taken over by another (``take_over_orphans``); the process identity in ``procs`` tells a
dead owner from a live one.
"""

from __future__ import annotations

import time
from typing import Any, Final

from handler import contract, logs, procs
from handler.backends.base import Backend, BackendUnavailable, RunState
from handler.contract import JobStatus
from handler.jobstate import ACTIVE, JobState, Transitions, job_span, now_iso
from handler.settings import HandlerSettings
from handler.store import Job, JobStore

log = logs.get("handler.reconcile")

CANCEL_RESEND_S: Final = 5.0


def _owner_alive(owner: str | None) -> bool:
    return owner is not None and procs.alive(owner.split("/", 1)[0])


class Reconciler:
    """Applies backend reports to stored jobs; one per service."""

    def __init__(
        self,
        settings: HandlerSettings,
        store: JobStore,
        backend: Backend,
        transitions: Transitions,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.transitions = transitions
        self._cancel_sent: dict[str, float] = {}

    # -- asking the backend ---------------------------------------------------------------------

    def refresh(self, job: Job) -> Job | None:
        """Ask the backend about a running job now and apply the answer."""
        return self.apply(job, self.backend.status(job.job_uuid, job.run_id))

    def cancel(self, job: Job) -> Job | None:
        """Ask the backend to stop the job's run; a backend that reports the stop at once ends
        the job now, not at the next poll or ping."""
        self.backend.cancel(job.job_uuid, job.run_id)
        self._cancel_sent[job.job_uuid] = time.monotonic()
        return self.refresh(job)

    def poll_owned(self, owner: str, stopping: Any) -> None:
        """Poll the running jobs ``owner`` owns (re-sending an unanswered cancel now and then)."""
        for job in self.store.owned(owner):
            if job.state != JobState.running or stopping():
                continue
            try:
                if job.cancel_requested:
                    sent = self._cancel_sent.get(job.job_uuid)
                    if sent is None or time.monotonic() - sent >= CANCEL_RESEND_S:
                        self.backend.cancel(job.job_uuid, job.run_id)
                        self._cancel_sent[job.job_uuid] = time.monotonic()
                self.refresh(job)
            except BackendUnavailable as exc:
                log.warning(
                    "backend unavailable while polling",
                    extra={"job_uuid": job.job_uuid, "problem": str(exc)},
                )

    def refresh_running(self) -> int:
        """Ask about every running job, whoever owns it (the reconcile tick); how many."""
        running = self.store.jobs((JobState.running,))
        for job in running:
            self.refresh(job)
        return len(running)

    def take_over_orphans(self, owner: str) -> list[Job]:
        """Take over active jobs whose worker is gone; return those still ``starting`` (their
        submit must be retried by the new owner)."""
        resubmit = []
        for job in self.store.jobs(ACTIVE):
            if job.owner == owner or _owner_alive(job.owner):
                continue
            if not self.store.take_over(job.job_uuid, job.owner, owner):
                continue
            log.info("took over job", extra={"job_uuid": job.job_uuid, "from": job.owner})
            if job.state == JobState.starting:
                fresh = self.store.job(job.job_uuid)
                if fresh is not None and fresh.state == JobState.starting:
                    resubmit.append(fresh)
        return resubmit

    # -- applying a report ----------------------------------------------------------------------

    def apply(self, job: Job, state: RunState) -> Job | None:
        """Record what the backend reported: finish the job, or note (and maybe announce) its
        progress. None: nothing changed."""
        if state.status.terminal:
            with job_span("job ended", job, status=state.status.value):
                return self._finish(job, state)
        return self._progressed(job, state)

    def _finish(self, job: Job, state: RunState) -> Job | None:
        status, fields = self.terminal_fields(job, state)
        done = self.transitions.finish(job, status, fields)
        if done is not None:
            self._cancel_sent.pop(job.job_uuid, None)
            log.info(
                "job ended",
                extra={"job_uuid": job.job_uuid, "status": status.value, "error": done.error},
            )
        return done

    def _progressed(self, job: Job, state: RunState) -> Job | None:
        progress = contract.progress_fields(state.progress)
        if progress is None or progress == job.progress or job.state != JobState.running:
            return None
        step = progress.get("step")
        due = (
            isinstance(step, int)
            and step != job.progress_emitted_step
            and (
                job.progress_emitted_at is None
                or time.time() - job.progress_emitted_at >= self.settings.progress_interval_s
                or contract.epoch_reports(progress) > contract.epoch_reports(job.progress)
            )
        )
        return self.transitions.progress(job, progress, step if due else None)

    def terminal_fields(self, job: Job, state: RunState) -> tuple[JobStatus, dict[str, Any]]:
        """The columns a finished job gets; a result that breaks the contract fails the job."""
        status = state.status
        if job.cancel_requested and status == JobStatus.failed:
            status = JobStatus.cancelled
        fields: dict[str, Any] = {
            "completed_at": contract.timestamp(state.completed_at) or now_iso(),
            "run_id": state.run_id or job.run_id,
            "result": dict(state.result or {}),
            "error": None if status == JobStatus.completed else (state.error or None),
            "progress": contract.progress_fields(state.progress) or job.progress,
        }
        if status == JobStatus.failed and not fields["error"]:
            fields["error"] = "the run failed without saying why"
        candidate = contract.status_data(
            job.job_uuid,
            status,
            run_id=fields["run_id"],
            scheduled_at=job.scheduled_at,
            started_at=job.started_at,
            completed_at=fields["completed_at"],
            progress=fields["progress"],
            result=fields["result"],
            error=fields["error"],
        )
        try:
            contract.validate_data(contract.STATUS_EVENT_TYPE[status], candidate)
        except contract.ContractError as exc:
            log.error("run result breaks the event contract", extra={"job_uuid": job.job_uuid})
            status = JobStatus.failed
            fields.update(
                result={},
                error=f"the run ended but its result does not fit the event contract: {exc}",
            )
        return status, fields
