"""What a job's KFP run, its S3 manifest and (maybe) the exit task's notice say about the job.

This is the one place remote mode decides a job's status; everything that answers (the reply to
``run.finished`` or a cancel, the reconcile tick, ``GET /jobs``) asks :func:`decide`. The rules,
first match wins:

1. ``result.json`` says ``completed``: the job is completed, whatever KFP says (training
   finished and its checkpoints exist; a cancel or a late failure cannot take that back).
2. KFP says CANCELED: cancelled, with whatever checkpoints the manifest lists. CANCELING is not
   an end yet: the run may still finish writing.
3. ``result.json`` says ``failed`` (or ``cancelled``): that, with its error. The train task has
   ended even while the exit task still runs.
4. KFP says FAILED or SKIPPED: failed, naming the real cause (:func:`cause`).
5. KFP says SUCCEEDED but no manifest exists: failed, naming where it should be.
6. KFP still says RUNNING (the exit task is part of the run) but a task has failed (its
   ``task_details`` say so) or the exit task's notice says how the body ended: that is the end
   (FAILED: the cause; CANCELED: cancelled).
7. Otherwise the job has not ended: PENDING is scheduled, RUNNING and PAUSED in progress.

S3 must have been read for any of this (the caller raises ``BackendUnavailable`` otherwise):
a terminal answer is never guessed from KFP alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from handler.backends.base import RunState
from handler.contract import JobStatus

_EPOCH: Final = "1970-01-01"
NOTICE_FAILED: Final = ("FAILED", "SKIPPED")
TRAIN_TASK: Final = "train"  # pipelines.pipeline.TRAIN_TASK (no pipelines import here)


@dataclass(frozen=True)
class Notice:
    """The exit task's ``run.finished`` data: how the pipeline body ended, as KFP told it."""

    state: str | None = None
    error: str | None = None
    run_id: str | None = None

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Notice:
        return cls(state=data.get("state"), error=data.get("error"), run_id=data.get("run_id"))


@dataclass(frozen=True)
class Manifest:
    """``result.json`` (pipelines' RunResult) and when S3 says it was written."""

    body: dict[str, Any]
    written_at: datetime | None

    @property
    def status(self) -> str | None:
        value = self.body.get("status")
        return value if value in ("completed", "failed", "cancelled") else None


def kfp_time(value: Any) -> datetime | None:
    """A KFP timestamp, or None for the zero time KFP uses for "not yet"."""
    if value is None or str(value).startswith(_EPOCH):
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def started_at(run: Any) -> datetime | None:
    for entry in run.state_history or []:
        if entry.state == "RUNNING":
            return kfp_time(entry.update_time)
    return None


def decide(
    run: Any,
    manifest: Manifest | None,
    *,
    where: str,
    notice: Notice | None = None,
    progress: dict[str, Any] | None = None,
) -> RunState:
    """The job's state by the rules above. ``where``: the manifest's URI, for messages."""
    state = run.state or "PENDING"
    common: dict[str, Any] = {
        "run_id": run.run_id,
        "scheduled_at": kfp_time(run.created_at),
        "started_at": started_at(run),
        "progress": progress,
    }
    ended = kfp_time(run.finished_at)
    body = manifest.body if manifest else {}
    written = manifest.written_at if manifest else None

    def end(status: JobStatus, error: str | None = None) -> RunState:
        completed_at = written or ended
        return RunState(
            status=status, result=body, error=error, completed_at=completed_at, **common
        )

    kind = manifest.status if manifest else None
    if kind == "completed":
        return end(JobStatus.completed)
    if state == "CANCELED":
        return end(JobStatus.cancelled)
    if kind == "cancelled":
        return end(JobStatus.cancelled)
    if kind == "failed":
        return end(JobStatus.failed, body.get("error") or cause(run, notice))
    if state in NOTICE_FAILED:
        return end(JobStatus.failed, cause(run, notice))
    if state == "SUCCEEDED":
        return end(JobStatus.failed, f"the run succeeded but wrote no result manifest at {where}")
    if state != "CANCELING" and _failed_task(run) is not None:
        return end(JobStatus.failed, cause(run, notice))
    if notice is not None and notice.state and state not in ("CANCELING",):
        if notice.state == "SUCCEEDED":
            return end(
                JobStatus.failed,
                f"the pipeline's body succeeded but wrote no result manifest at {where}",
            )
        if notice.state in NOTICE_FAILED:
            return end(JobStatus.failed, cause(run, notice))
        if notice.state == "CANCELED":
            return end(JobStatus.cancelled)
    status = JobStatus.scheduled if state == "PENDING" else JobStatus.in_progress
    return RunState(status=status, **common)


def cause(run: Any, notice: Notice | None) -> str:
    """Why a run failed, as precisely as KFP can say: the failed task's own error (its
    termination message, or Kubernetes' ``OOMKilled``), else the notice's, else the run's."""
    task = _failed_task(run)
    if task is not None:
        name, message = task
        return explain(name, message)
    if notice is not None and notice.error:
        return f"the run failed: {notice.error}"
    error = getattr(run, "error", None)
    message = getattr(error, "message", None) if error is not None else None
    return f"the run failed: {message}" if message else f"the KFP run ended {run.state}"


def explain(task: str, message: str) -> str:
    """A failed task's error in words a user can act on."""
    text = f"the {task} task failed: {message}"
    if message.startswith("OOMKilled"):
        return (
            f"{text}: it ran out of memory; raise KFP_TRAINER_MEMORY_LIMIT, or lower the batch "
            "size or the sequence length"
        )
    if "exit code 137" in message:
        return f"{text}: it was killed (SIGKILL), as the out-of-memory killer does"
    return text


def _failed_task(run: Any) -> tuple[str, str] | None:
    """(task name, error message) of the failed task that says most: the train task first."""
    details = getattr(run, "run_details", None)
    tasks = getattr(details, "task_details", None) or []
    failed = [
        (str(t.display_name or "?"), str(t.error.message))
        for t in tasks
        if t.state == "FAILED" and getattr(t, "error", None) is not None and t.error.message
    ]
    failed.sort(key=lambda item: item[0] != TRAIN_TASK)
    return failed[0] if failed else None


__all__ = ["Manifest", "Notice", "cause", "decide", "explain", "kfp_time", "started_at"]
