"""Local mode's service between requests: start, stop and the two threads that run meanwhile.

The dispatcher claims queued jobs in order (within the backend's ``max_concurrent``), submits
them, takes over jobs whose worker died and polls the runs it owns (every ``poll_interval_s``);
the outbox loop delivers emitted events. Both sleep until woken or a tick passes. ``stop``
hands running jobs back (a graceful stop), so the next worker takes them over at once.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Final

from handler import logs, metrics
from handler.backends.base import BackendRejected, BackendUnavailable
from handler.jobstate import job_span
from handler.store import Job, StoreUnavailable
from pipelines import tracing
from pipelines.pipeline import TRACE_FIELD

if TYPE_CHECKING:
    from handler.service import LocalService

log = logs.get("handler.lifecycle")

TICK_S: Final = 0.5  # how often a worker looks for work queued by other workers
TAKE_OVER_EVERY_S: Final = 2.0
READY_CACHE_S: Final = 1.0


class Lifecycle:
    """The threads of one :class:`LocalService` and how they start and stop."""

    def __init__(self, service: LocalService) -> None:
        self.service = service
        self._stop = threading.Event()
        self._wake_dispatch = threading.Event()
        self._wake_outbox = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._ready_until = 0.0

    # -- start and stop -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher and outbox threads (idempotent; subscribe first)."""
        with self._lock:
            if self._threads:
                return
            self._stop.clear()
            for name, target in (("dispatch", self._dispatch_loop), ("outbox", self._outbox_loop)):
                thread = threading.Thread(target=target, name=f"kfp-trainer-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        service = self.service
        log.info(
            "handler service started",
            extra={
                "owner": service.owner,
                "backend": service.backend.name,
                "db": str(service.store.path),
            },
        )

    def start_once(self) -> None:
        """Start unless started or stopped: the lazy start on a worker's first request."""
        if not self._threads and not self._stop.is_set():
            self.start()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads and give running jobs back; nothing in flight is flushed.

        Running local trainings keep running in their own sessions; the next service (this
        deployment's other worker, or the handler after a restart) takes them over.
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
            self.service.store.release(self.service.owner)
        except StoreUnavailable as exc:
            log.warning("could not release jobs on stop", extra={"problem": str(exc)})
        self.service.outbox.close()
        if threads:
            log.info("handler service stopped", extra={"owner": self.service.owner})

    # -- what requests tell the threads ---------------------------------------------------------

    def queued(self) -> None:
        """A job was queued: the dispatcher has work (unless the backend starts nothing)."""
        if self.service.backend.max_concurrent != 0:
            self._wake_dispatch.set()
        if not self.service.store.born_delivered(reply=True):  # subscribers want job.scheduled
            self._wake_outbox.set()

    def emitted(self) -> None:
        """Events may have been emitted: wake the delivery loop unless nobody needs them."""
        if not self.service.store.born_delivered():
            self._wake_outbox.set()

    def wake(self) -> None:
        self._wake_dispatch.set()

    def backend_ready(self) -> bool:
        """``backend.ready()``, remembered for a second when true (it may cost a round trip)."""
        now = time.monotonic()
        if now < self._ready_until:
            return True
        ready = bool(self.service.backend.ready())
        self._ready_until = now + READY_CACHE_S if ready else 0.0
        return ready

    # -- the dispatcher -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Start the run of a job this worker has claimed (state ``starting``)."""
        with job_span("submit", job):
            self._start_run(job)

    def _start_run(self, job: Job) -> None:
        service = self.service
        owner = service.owner
        try:
            run_id = service.backend.submit({**job.request, TRACE_FIELD: tracing.carrier()})
        except BackendUnavailable as exc:
            delay = service.outbox.backoff(job.submit_attempts + 1)
            requeued = service.transitions.requeue(job, owner, delay)
            log.warning(
                "backend unavailable; job stays queued",
                extra={"job_uuid": job.job_uuid, "retry_in_s": delay, "problem": str(exc)},
            )
            if requeued is not None and requeued.terminal:
                self.emitted()
            return
        except BackendRejected as exc:
            self._fail(job, str(exc))
            return
        except Exception as exc:
            log.exception("submit failed", extra={"job_uuid": job.job_uuid})
            self._fail(job, f"the run could not be started: {type(exc).__name__}: {exc}")
            return
        running = service.transitions.start(job, owner, run_id)
        if running is None:
            log.warning("job changed hands during submit", extra={"job_uuid": job.job_uuid})
            return
        metrics.JOBS_SUBMITTED.inc()
        log.info("job started", extra={"job_uuid": job.job_uuid, "run_id": run_id})
        self.emitted()
        if running.cancel_requested:
            service.reconciler.cancel(running)

    def _fail(self, job: Job, error: str) -> None:
        self.service.transitions.fail(job, error)
        log.warning("job failed to start", extra={"job_uuid": job.job_uuid, "error": error})
        self.emitted()

    def take_over_orphans(self) -> None:
        """Take over the jobs of workers that are gone; resubmit those caught mid-submit."""
        for job in self.service.reconciler.take_over_orphans(self.service.owner):
            self.submit(job)

    def _submit_queued(self) -> None:
        service = self.service
        while not self._stop.is_set():
            job = service.store.claim_next(
                service.owner, service.backend.max_concurrent, time.time()
            )
            if job is None:
                return
            self.submit(job)

    def _dispatch_loop(self) -> None:
        service = self.service
        poll_s = service.backend.poll_interval_s
        next_take_over = 0.0
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_take_over:
                    self.take_over_orphans()
                    next_take_over = now + TAKE_OVER_EVERY_S
                self._submit_queued()
                if poll_s is not None and time.monotonic() >= next_poll:
                    service.reconciler.poll_owned(service.owner, self._stop.is_set)
                    self.emitted()
                    next_poll = time.monotonic() + poll_s
            except StoreUnavailable as exc:
                log.warning("store unavailable in dispatcher", extra={"problem": str(exc)})
            except Exception:
                log.exception("dispatcher iteration failed")
            self._wake_dispatch.wait(TICK_S if poll_s is None else min(TICK_S, poll_s))
            self._wake_dispatch.clear()

    def _outbox_loop(self) -> None:
        while not self._stop.is_set():
            delivered = 0
            try:
                delivered = self.service.outbox.run_once()
            except StoreUnavailable as exc:
                log.warning("store unavailable in outbox", extra={"problem": str(exc)})
            except Exception:
                log.exception("outbox iteration failed")
            if delivered:
                continue
            self._wake_outbox.wait(TICK_S)
            self._wake_outbox.clear()
