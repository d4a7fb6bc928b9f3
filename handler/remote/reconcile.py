"""The reconcile tick: announce again every run that ended within the last two tick periods.

A PingSource tick may arrive at any replica, which remembers nothing, so it re-emits the
terminal event (deterministic id, and the job's trace from the run's parameters) of each of
this deployment's runs that ended since two periods ago: every end is announced by about two
ticks, whether or not its ``run.finished`` notice got through, and consumers drop the repeats
by ``source`` + ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from handler import logs
from handler.backends.base import BackendUnavailable
from handler.remote.runs import run_trace
from handler.sink import DeliveryError, SinkClient

if TYPE_CHECKING:
    from handler.remote.service import RemoteService

log = logs.get("handler.remote.reconcile")


@dataclass(frozen=True)
class Tick:
    """What one tick did: runs looked at, terminal events delivered, and those that were not."""

    reconciled: int
    emitted: int
    failed: int


def window_start(period_s: float, now: datetime | None = None) -> datetime:
    """Two tick periods back: a run that ended since then is announced by this tick."""
    return (now or datetime.now(UTC)) - timedelta(seconds=2 * period_s)


def tick(service: RemoteService, sink: SinkClient, period_s: float) -> Tick:
    """Emit the terminal event of every run that ended in the window, to ``sink``.

    :raises BackendUnavailable: KFP cannot list runs (the tick is answered 503).
    """
    runs = service.runs.ended_since(window_start(period_s))
    emitted = failed = 0
    for run in runs:
        job_uuid = run.display_name
        with service.job_span("reconcile", job_uuid, run_trace(run)):  # the job's own trace
            try:
                state = service.runs.state(run)
            except BackendUnavailable as exc:  # S3 for this run: the next tick tries again
                log.warning(
                    "reconcile skipped a run", extra={"job_uuid": job_uuid, "problem": str(exc)}
                )
                failed += 1
                continue
            if not state.status.terminal:  # e.g. CANCELING that has not settled
                continue
            try:
                sink.post(service.terminal_event(job_uuid, state))
                emitted += 1
            except DeliveryError as exc:
                log.warning(
                    "reconcile could not emit", extra={"job_uuid": job_uuid, "problem": str(exc)}
                )
                failed += 1
    log.info("reconciled", extra={"runs": len(runs), "emitted": emitted, "failed": failed})
    return Tick(reconciled=len(runs), emitted=emitted, failed=failed)
