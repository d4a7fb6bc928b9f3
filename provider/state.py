"""The provider's own persisted copy of every job, kept in llama-stack's kvstore, fed by events.

The handler (local store or KFP) is the system of record; this copy lets status, artifacts and
list answer at once and survive a restart of ``llama stack run``. Updates arrive from several
threads (the in-process handler's outbox, API calls), so one thread with its own event loop owns
the kvstore and applies them in order: a single writer, no lost read-modify-write.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Final, TypeVar

from llama_stack.apis.common.job_types import JobStatus
from llama_stack.providers.utils.kvstore import KVStore, KVStoreConfig, kvstore_impl

from handler.contract import now_iso  # the one timestamp format, the handler's too

KEY_PREFIX: Final = "kfp-trainer:job:"
# Fields an event or a GET /jobs answer may update; anything else in a record is ours.
EVENT_FIELDS: Final = (
    "run_id",
    "scheduled_at",
    "started_at",
    "completed_at",
    "progress",
    "checkpoints",
    "resources_allocated",
    "dataset_rows",
    "rows_without_trainable_tokens",
    "error",
)
T = TypeVar("T")


def to_job_status(status: str) -> JobStatus:
    """The one place a contract/handler job state becomes llama-stack's ``JobStatus``.

    :raises ValueError: a state this provider does not know (names it).
    """
    match status:
        case "scheduled":
            return JobStatus.scheduled
        case "in_progress":
            return JobStatus.in_progress
        case "completed":
            return JobStatus.completed
        case "failed":
            return JobStatus.failed
        case "cancelled":
            return JobStatus.cancelled
        case _:
            raise ValueError(f"unknown job status {status!r}")


def _rank(status: JobStatus) -> int:
    """Order of a job's life; terminal states share the last rank and never move again."""
    return {JobStatus.scheduled: 0, JobStatus.in_progress: 1}.get(status, 2)


def is_terminal(record: dict[str, Any]) -> bool:
    return _rank(to_job_status(record["status"])) == 2


def merge(record: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """Fold one status update (job.status.json shape) into a record; late or repeated updates
    never move a job backwards, and a terminal state is final.

    >>> r = merge(None, {"job_uuid": "j", "status": "completed"})
    >>> merge(r, {"job_uuid": "j", "status": "in_progress"})["status"]
    'completed'
    """
    new_status = to_job_status(update["status"])
    current = dict(record) if record else {"job_uuid": update["job_uuid"], "status": "scheduled"}
    current_status = to_job_status(current["status"])
    terminal = _rank(current_status) == 2
    advance = not terminal and _rank(new_status) >= _rank(current_status)
    refresh = advance or (terminal and new_status == current_status)
    for name in EVENT_FIELDS:
        value = update.get(name)
        if value is None:
            continue
        if name == "progress" and not _newer_progress(current.get("progress"), value):
            continue
        if refresh or current.get(name) in (None, [], {}):
            current[name] = value
    if advance:
        current["status"] = new_status.value
    current["updated_at"] = now_iso()
    return current


def _newer_progress(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    if not old:
        return True
    return int(new.get("step") or 0) >= int(old.get("step") or 0)


class JobStore:
    """Job records in a kvstore, owned by one background thread (the single writer).

    Coroutine methods may be awaited from any event loop; :meth:`apply_soon` may be called from
    any thread and returns without waiting.
    """

    def __init__(self, config: KVStoreConfig) -> None:
        self._config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kv: KVStore | None = None
        self._lock: asyncio.Lock | None = None

    def start(self) -> None:
        """Start the owner thread and open the kvstore in its loop (blocking until ready)."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="kfp-trainer-jobstore", daemon=True
        )
        self._thread.start()
        self._submit(self._open()).result(timeout=60)

    async def _open(self) -> None:
        self._kv = await kvstore_impl(self._config)
        self._lock = asyncio.Lock()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued updates, then stop the owner thread."""
        if self._loop is None or self._thread is None:
            return
        try:
            self._submit(self._barrier()).result(timeout=timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout)
            self._loop = None

    async def _barrier(self) -> None:
        assert self._lock is not None
        async with self._lock:
            return None

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._loop is None:
            coro.close()
            raise RuntimeError("job store is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self._submit(coro))

    # -- in the owner loop ---------------------------------------------------------------

    async def _get(self, job_uuid: str) -> dict[str, Any] | None:
        assert self._kv is not None
        raw = await self._kv.get(KEY_PREFIX + job_uuid)
        return json.loads(raw) if raw else None

    async def _put(self, record: dict[str, Any]) -> None:
        assert self._kv is not None
        await self._kv.set(KEY_PREFIX + record["job_uuid"], json.dumps(record, default=str))

    async def _create(self, record: dict[str, Any]) -> bool:
        assert self._lock is not None
        async with self._lock:
            if await self._get(record["job_uuid"]) is not None:
                return False
            await self._put(record)
            return True

    async def _apply(self, update: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
        assert self._lock is not None
        async with self._lock:
            record = merge(await self._get(update["job_uuid"]), update)
            record.update(extra or {})
            await self._put(record)
            return record

    async def _change(
        self, job_uuid: str, change: Callable[[dict[str, Any]], object]
    ) -> dict[str, Any] | None:
        assert self._lock is not None
        async with self._lock:
            record = await self._get(job_uuid)
            if record is None:
                return None
            change(record)
            await self._put(record)
            return record

    async def _delete(self, job_uuid: str) -> None:
        assert self._kv is not None and self._lock is not None
        async with self._lock:
            await self._kv.delete(KEY_PREFIX + job_uuid)

    async def _all(self) -> list[dict[str, Any]]:
        assert self._kv is not None
        values = await self._kv.values_in_range(KEY_PREFIX, KEY_PREFIX + "\xff")
        return [json.loads(v) for v in values]

    # -- public ----------------------------------------------------------------------------

    async def create(self, record: dict[str, Any]) -> bool:
        """Store a new record; False (and nothing written) when the job uuid is taken."""
        return await self._call(self._create(record))

    async def get(self, job_uuid: str) -> dict[str, Any] | None:
        return await self._call(self._get(job_uuid))

    async def all(self) -> list[dict[str, Any]]:
        """Every record, oldest request first."""
        records = await self._call(self._all())
        return sorted(records, key=lambda r: (r.get("requested_at") or "", r["job_uuid"]))

    async def apply(
        self, update: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Merge a status update (see :func:`merge`); ``extra`` sets provider-own fields."""
        return await self._call(self._apply(update, extra))

    async def patch(self, job_uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Set provider-own fields of a record (no state change); None when there is none."""
        return await self._call(self._change(job_uuid, lambda record: record.update(fields)))

    async def change(
        self, job_uuid: str, change: Callable[[dict[str, Any]], object]
    ) -> dict[str, Any] | None:
        """Apply ``change`` to the record in place, atomically; None when there is none."""
        return await self._call(self._change(job_uuid, change))

    async def delete(self, job_uuid: str) -> None:
        await self._call(self._delete(job_uuid))

    def apply_soon(self, update: dict[str, Any]) -> Future[dict[str, Any]]:
        """Queue an update from any thread (event callbacks); applied in arrival order."""
        return self._submit(self._apply(update, None))
