"""The work a fine-tune call leaves behind: one asyncio task per job, on a loop of our own.

``supervised_fine_tune`` returns once the job is recorded; staging its datasets and sending its
``job.requested`` happen in a task started here. The tasks run on an event loop in a thread
this object owns, not on llama-stack's: llama-stack 0.2.12 initializes providers in a loop of
its own that ends before the server's starts, so work resumed at start-up would die with it,
and the server's loop stays free for requests.

The tasks are only a means: what a task is doing is written in the job's record (its
``phase``), so a restarted ``llama stack run`` starts the same work again from the record, and
a task cancelled by shutdown leaves it to that.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("provider.background")
T = TypeVar("T")


class BackgroundJobs:
    """At most one task per job uuid; each removes itself when it ends.

    Every method may be called from any thread or event loop; the task table belongs to the
    owner loop alone.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def open(self) -> None:
        """Start the owner thread and its loop."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name="kfp-trainer-background", daemon=True
        )
        self._loop = loop
        self._thread.start()

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the owner loop and await its result from the caller's loop."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("background jobs are not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def start(self, job_uuid: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``job_uuid`` (closed unstarted when a task for it is running)."""
        await self._on_loop(self._start(job_uuid, work))

    async def _start(self, job_uuid: str, work: Coroutine[Any, Any, None]) -> None:
        if job_uuid in self._tasks:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work, name=f"kfp-trainer-job-{job_uuid}")
        self._tasks[job_uuid] = task
        task.add_done_callback(lambda t: self._ended(job_uuid, t))

    def _ended(self, job_uuid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_uuid) is task:
            del self._tasks[job_uuid]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "background work of a job failed unexpectedly",
                exc_info=task.exception(),
                extra={"job_uuid": job_uuid},
            )

    async def wait(self, job_uuid: str) -> None:
        """Until the job's task (if any) has ended, however it ends."""
        await self._on_loop(self._wait(job_uuid, cancel=False))

    async def cancel(self, job_uuid: str) -> bool:
        """Cancel the job's task and wait for it to end; False when none was running."""
        return await self._on_loop(self._wait(job_uuid, cancel=True))

    async def _wait(self, job_uuid: str, *, cancel: bool) -> bool:
        task = self._tasks.get(job_uuid)
        if task is None:
            return False
        if cancel:
            task.cancel()
        await asyncio.wait([task])
        return True

    async def stop(self, timeout: float = 30.0) -> None:
        """Cancel every task (shutdown), then stop the owner loop: the records say what to
        start again next time."""
        if self._loop is None:
            return
        try:
            await asyncio.wait_for(self._on_loop(self._cancel_all()), timeout)
        finally:
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


__all__ = ["BackgroundJobs"]
