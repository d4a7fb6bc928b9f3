"""The job store: jobs and the outbox of emitted events in one SQLite file.

SQLite in WAL mode is the system of record in local mode and the work queue in both modes. Every
gunicorn worker process opens the same file; writes that decide something (claiming a job,
changing its state, emitting an event) run in ``BEGIN IMMEDIATE`` transactions, so N processes
claim jobs in order, respect the concurrency limit and emit each event once. A state change and
the event that announces it are written in the same transaction: no event without its state, and
no state without its event.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Final, get_args

from cloudevents.core.base import BaseCloudEvent

from handler import contract
from handler.contract import JOB_SCHEDULED, JSON_FORMAT, JobStatus, event_id
from handler.jobstate import ACTIVE, JobState
from handler.settings import DbSync

_SCHEMA: Final = "schema.sql"  # next to this module, read once per store


class StoreUnavailable(RuntimeError):
    """The database cannot be read or written right now (locked, disk, permissions): 503."""


# SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms: fine for
# rare contention, a p99 disaster for short transactions from several processes. It gets a
# token timeout; the store retries itself with sub-millisecond-to-5 ms jittered sleeps.
_SQLITE_BUSY_MS: Final = 2
_RETRY_MIN_S: Final = 0.00005
_RETRY_MAX_S: Final = 0.001


def _busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``, decoded."""

    seq: int
    job_uuid: str
    digest: str
    request: dict[str, Any]
    state: JobState
    cancel_requested: bool
    run_id: str | None
    owner: str | None
    scheduled_at: str
    started_at: str | None
    completed_at: str | None
    progress: dict[str, Any] | None
    progress_emitted_at: float | None
    progress_emitted_step: int | None
    result: dict[str, Any]
    error: str | None
    submit_attempts: int
    next_submit_at: float
    caller: str | None = None  # who requested it (handler/identity.py), when checked

    @property
    def status(self) -> JobStatus:
        return self.state.status

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def to_status(self) -> dict[str, Any]:
        """The job.status.json shape: what GET /jobs answers and every emitted event carries."""
        return contract.status_data(
            self.job_uuid,
            self.status,
            run_id=self.run_id,
            scheduled_at=self.scheduled_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
            progress=self.progress,
            result=self.result,
            error=self.error,
        )


def new_job(
    *,
    job_uuid: str,
    digest: str,
    request: dict[str, Any],
    scheduled_at: str,
    caller: str | None = None,
) -> Job:
    """A job as it is when first queued (before the store gives it a sequence number)."""
    return Job(
        seq=0,
        job_uuid=job_uuid,
        digest=digest,
        request=request,
        state=JobState.queued,
        cancel_requested=False,
        run_id=None,
        owner=None,
        scheduled_at=scheduled_at,
        started_at=None,
        completed_at=None,
        progress=None,
        progress_emitted_at=None,
        progress_emitted_step=None,
        result={},
        error=None,
        submit_attempts=0,
        next_submit_at=0.0,
        caller=caller,
    )


@dataclass(frozen=True)
class OutboxRow:
    """One undelivered emitted event, leased to the worker delivering it."""

    seq: int
    event_id: str
    job_uuid: str
    type: str
    event: dict[str, Any]
    sink_done: bool
    local_done: bool
    attempts: int


@dataclass
class _Group:
    """Job inserts that share one transaction (see :meth:`JobStore.insert_job`)."""

    items: list[tuple[Job, str, BaseCloudEvent, str]] = field(default_factory=list)
    results: list[tuple[Job, bool]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Conns(threading.local):
    conn: sqlite3.Connection | None = None


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        seq=row["seq"],
        job_uuid=row["job_uuid"],
        digest=row["digest"],
        request=json.loads(row["request"]),
        state=JobState(row["state"]),
        cancel_requested=bool(row["cancel_requested"]),
        run_id=row["run_id"],
        owner=row["owner"],
        scheduled_at=row["scheduled_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        progress=_loads(row["progress"]),
        progress_emitted_at=row["progress_emitted_at"],
        progress_emitted_step=row["progress_emitted_step"],
        result=_loads(row["result"]) or {},
        error=row["error"],
        submit_attempts=row["submit_attempts"],
        next_submit_at=row["next_submit_at"],
        caller=row["caller"],
    )


# Columns a state change may set, and how each is encoded.
_JSON_COLUMNS: Final = ("progress", "result", "backend_state")
_SETTABLE: Final = frozenset(
    {
        "state",
        "cancel_requested",
        "run_id",
        "owner",
        "started_at",
        "completed_at",
        "progress",
        "progress_emitted_at",
        "progress_emitted_step",
        "result",
        "error",
        "submit_attempts",
        "next_submit_at",
    }
)


# The head of the queue (and, for a limited backend, how many jobs are active), read together.
_CLAIMABLE: Final = (
    "SELECT next_submit_at FROM jobs WHERE state = ? AND cancel_requested = 0 ORDER BY seq LIMIT 1"
)
_CLAIMABLE_UNDER_LIMIT: Final = (
    "SELECT next_submit_at, (SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)) AS active"
    " FROM jobs WHERE state = ? AND cancel_requested = 0 ORDER BY seq LIMIT 1"
)


_INSERT: Final = (
    "INSERT INTO jobs (job_uuid, digest, request, state, scheduled_at, updated_at, reply, caller)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_uuid) DO NOTHING"
)
# The same, only while the caller has fewer than ? unfinished jobs (the jobs_state index
# finds those). The WHERE is also what lets SQLite parse an upsert of a SELECT.
_INSERT_UNDER_CAP: Final = (
    "INSERT INTO jobs (job_uuid, digest, request, state, scheduled_at, updated_at, reply, caller)"
    " SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE"
    " (SELECT COUNT(*) FROM jobs WHERE caller = ? AND state IN (?, ?, ?)) < ?"
    " ON CONFLICT (job_uuid) DO NOTHING"
)
_UNFINISHED: Final = (JobState.queued, JobState.starting, JobState.running)


class JobStore:
    """Jobs and outbox in one SQLite file; safe across threads and processes.

    Each thread gets its own connection (opened on first use, so constructing a store does no
    I/O). Every ``sqlite3`` failure surfaces as :class:`StoreUnavailable`.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0, sync: DbSync = "normal") -> None:
        """:param sync: SQLite ``synchronous`` in WAL mode. ``normal``: a commit is in the WAL
        (the OS has it) when it returns, so it survives the process being killed; a power loss
        may undo the last ones, never corrupt the file. ``full``: fsync per commit as well."""
        if sync not in get_args(DbSync):
            raise ValueError(f"sync must be 'normal' or 'full', not {sync!r}")
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.sync = sync
        self._local = _Conns()
        self._lock = threading.Lock()
        self._opened: list[sqlite3.Connection] = []
        self._schema_ready = False
        self._writer_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._group_lock = threading.Lock()
        self._group: _Group | None = None
        # Who still needs an emitted event: an HTTP sink, in-process subscribers. An event
        # nobody needs is born delivered (no outbox traffic in a deployment without a sink).
        self.sink_delivery = True
        self.local_delivery = True

    # -- connections -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = self._local.conn
        if conn is not None:
            return conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=_SQLITE_BUSY_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"job store {self.path} cannot be opened: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            # Even pragmas can meet a lock while another process sets the file up: retry them.
            self._retrying("cannot be opened", lambda: self._setup(conn))
        except StoreUnavailable:
            with suppress(sqlite3.Error):
                conn.close()
            raise
        self._local.conn = conn
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        """Connection pragmas; WAL mode (persistent in the file) and the tables once per store."""
        conn.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
        conn.execute(f"PRAGMA synchronous = {self.sync.upper()}")
        with self._lock:
            if not self._schema_ready:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(resources.files("handler").joinpath(_SCHEMA).read_text())
                columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
                if "reply" not in columns:  # a store written before replies lived in jobs
                    conn.execute("ALTER TABLE jobs ADD COLUMN reply TEXT")
                if "caller" not in columns:  # a store written before callers were known
                    conn.execute("ALTER TABLE jobs ADD COLUMN caller TEXT")
                self._schema_ready = True
            if conn not in self._opened:
                self._opened.append(conn)

    def close(self) -> None:
        """Close every connection this store opened (call once its threads have stopped)."""
        with self._lock:
            for conn in self._opened:
                with suppress(sqlite3.Error):
                    conn.close()
            self._opened.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        self._local = _Conns()

    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` until it stops hitting a lock, for at most ``busy_timeout_s``."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = _RETRY_MIN_S
        while True:
            try:
                return attempt()
            except sqlite3.Error as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise StoreUnavailable(f"job store {self.path} {what}: {exc}") from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _RETRY_MAX_S)

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Queue writers in the kernel, not in SQLite's sleep-and-retry busy loop.

        One thread per process (a lock), one process per file (``flock`` on ``<db>.lock``,
        released by the kernel if the holder dies): a waiting writer wakes the moment the
        previous one commits, which keeps tail latency flat when several gunicorn workers and
        their threads write at once. SQLite's own locking still guards everything else.
        """
        if not self._writer_lock.acquire(timeout=self.busy_timeout_s):
            raise StoreUnavailable(f"job store {self.path} is not writable now: busy")
        try:
            with self._file_lock():
                yield
        finally:
            self._writer_lock.release()

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """The process-wide half of :meth:`_writer` (its caller holds the thread lock)."""
        if self._lock_fd is None:
            try:
                # A write can be this process's first touch of the store: the directory may
                # not exist yet (the connection, which also makes it, is opened after).
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(
                    f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StoreUnavailable(f"job store {self.path} lock file: {exc}") from exc
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database lock up front (no upgrade deadlocks)."""
        with self._writer(), self._tx_locked() as conn:
            yield conn

    @contextmanager
    def _tx_locked(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        self._retrying("is not writable now", lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"job store {self.path} failed a write: {exc}") from exc
            raise
        try:
            self._retrying("could not commit", lambda: conn.execute("COMMIT"))
        except StoreUnavailable:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = self._conn()
        return self._retrying("cannot be read", lambda: conn.execute(sql, args).fetchall())

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store can be read (backs /readyz)."""
        self._read("SELECT 1 FROM jobs LIMIT 1")

    # -- jobs ----------------------------------------------------------------------------------

    def add_event(self, event: BaseCloudEvent) -> None:
        """Emit an event that changes no job here (an event id already emitted is ignored)."""
        with self._tx() as conn:
            self._add_event(conn, event)

    def insert_job(
        self, job: Job, event: BaseCloudEvent, *, max_active: int = 0
    ) -> tuple[Job | None, bool]:
        """Queue ``job`` (from :func:`new_job`) with its job.scheduled ``event``, unless a job
        with that job_uuid is stored already, which is returned instead.

        ``max_active`` (with ``job.caller``): queue it only while the caller has fewer
        unfinished jobs, counted in the same statement as the insert, so concurrent requests
        cannot pass the limit together; ``(None, False)`` when it is reached. A redelivery is
        answered as ever: it is no new job.

        The event is built before the transaction, so the write lock is held for the insert
        only. It travels as the HTTP reply and is kept in the job's row (a redelivery gets it
        again); it joins the outbox only when in-process subscribers still need it. Without
        them, queueing a job is one INSERT: its own transaction.

        Group commit: inserts from several threads of this process (gunicorn's gthread worker)
        that arrive while the write lock is taken share the next transaction, and so one
        fsync. The first of them leads: it waits for the lock and commits them all; every
        caller returns only once that commit is durable. One thread alone commits alone.

        :return: (the stored job, whether it was created now)
        """
        cap = max_active if job.caller else 0
        item = (job, _dumps(job.request), event, JSON_FORMAT.write(event).decode(), cap)
        if self._group is None and self._writer_lock.acquire(blocking=False):
            # Nobody here writes or waits to: no group to lead or join (a sync worker, always).
            # A thread arriving meanwhile forms the next group, as it would behind a leader.
            try:
                with self._file_lock():
                    return self._insert_items([item])[0]
            finally:
                self._writer_lock.release()
        with self._group_lock:
            batch = self._group
            leader = batch is None
            if batch is None:
                batch = self._group = _Group()
            index = len(batch.items)
            batch.items.append(item)
        if leader:
            self._commit_group(batch)
        else:
            batch.done.wait()
        if batch.error is None:
            return batch.results[index]
        if leader:
            raise batch.error
        if isinstance(batch.error, StoreUnavailable):  # each caller raises its own exception
            raise StoreUnavailable(str(batch.error)) from batch.error
        raise StoreUnavailable(f"job store {self.path} failed a write: {batch.error!r}")

    def _commit_group(self, batch: _Group) -> None:
        try:
            with self._writer():
                with self._group_lock:
                    self._group = None  # later arrivals form the next group
                batch.results = self._insert_items(batch.items)
        except BaseException as exc:
            batch.error = exc
        finally:
            with self._group_lock:
                if self._group is batch:  # the lock was never had: nobody else may join it
                    self._group = None
            batch.done.set()

    def _insert_items(self, items: list[tuple[Any, ...]]) -> list[tuple[Job | None, bool]]:
        """Insert ``items`` in one transaction (the caller holds :meth:`_writer`)."""
        if len(items) == 1 and self.born_delivered(reply=True):
            # One INSERT is its own transaction: no BEGIN and COMMIT round trips.
            insert = partial(self._insert_queued, self._conn(), *items[0])
            return [self._retrying("is not writable now", insert)]
        with self._tx_locked() as conn:
            return [self._insert_queued(conn, *item) for item in items]

    def _insert_queued(
        self,
        conn: sqlite3.Connection,
        job: Job,
        request: str,
        event: BaseCloudEvent,
        reply: str,
        cap: int,
    ) -> tuple[Job | None, bool]:
        values = (
            job.job_uuid,
            job.digest,
            request,
            JobState.queued,
            job.scheduled_at,
            time.time(),
            reply,
            job.caller,
        )
        if cap:
            cur = conn.execute(_INSERT_UNDER_CAP, (*values, job.caller, *_UNFINISHED, cap))
        else:
            cur = conn.execute(_INSERT, values)
        if cur.rowcount == 0:  # stored already (a redelivery), or the caller is at its cap
            row = conn.execute("SELECT * FROM jobs WHERE job_uuid = ?", (job.job_uuid,)).fetchone()
            return (_job(row), False) if row is not None else (None, False)
        if not self.born_delivered(reply=True):  # in-process subscribers still need it
            self._add_event(conn, event, reply=True, encoded=reply)
        return replace(job, seq=cur.lastrowid or 0), True

    def scheduled_event(self, job_uuid: str) -> dict[str, Any] | None:
        """The job.scheduled a job was accepted with (structured-mode dict): what a redelivered
        request is answered with again, byte for byte."""
        rows = self._read("SELECT reply FROM jobs WHERE job_uuid = ?", (job_uuid,))
        if rows and rows[0]["reply"]:
            return json.loads(rows[0]["reply"])
        # A store written before replies lived in the job row kept it in the outbox only.
        return self.event(event_id(job_uuid, JOB_SCHEDULED))

    def job(self, job_uuid: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE job_uuid = ?", (job_uuid,))
        return _job(rows[0]) if rows else None

    def page(self, after_seq: int, limit: int) -> list[Job]:
        """Up to ``limit`` jobs queued after sequence number ``after_seq``, oldest first."""
        rows = self._read(
            "SELECT * FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        )
        return [_job(r) for r in rows]

    def jobs(self, states: tuple[str, ...] | None = None) -> list[Job]:
        """All jobs (or those in ``states``), oldest first."""
        if states:
            marks = ",".join("?" * len(states))
            rows = self._read(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states)
        else:
            rows = self._read("SELECT * FROM jobs ORDER BY seq")
        return [_job(r) for r in rows]

    def request(self, job_uuid: str) -> dict[str, Any]:
        job = self.job(job_uuid)
        if job is None:
            raise KeyError(job_uuid)
        return job.request

    def backend_state(self, job_uuid: str) -> dict[str, Any]:
        rows = self._read("SELECT backend_state FROM jobs WHERE job_uuid = ?", (job_uuid,))
        return (_loads(rows[0]["backend_state"]) or {}) if rows else {}

    def set_backend_state(self, job_uuid: str, state: dict[str, Any]) -> None:
        """Merge ``state`` into the backend's private per-job state."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT backend_state FROM jobs WHERE job_uuid = ?", (job_uuid,)
            ).fetchone()
            if row is None:
                raise KeyError(job_uuid)
            merged = {**(_loads(row["backend_state"]) or {}), **state}
            conn.execute(
                "UPDATE jobs SET backend_state = ?, updated_at = ? WHERE job_uuid = ?",
                (_dumps(merged), time.time(), job_uuid),
            )

    def update(
        self,
        job_uuid: str,
        *,
        when: Callable[[Job], bool],
        change: Callable[[Job], dict[str, Any]],
        emit: Callable[[Job], BaseCloudEvent | None] | None = None,
    ) -> Job | None:
        """The one way a job changes: atomically, if ``when(job)``; plus the event announcing it.

        :param when: checked on the current row inside the transaction; False: nothing happens.
        :param change: the columns to set, computed from the current row.
        :param emit: builds the event from the updated row; it joins the outbox in the same
            transaction (an event id already in the outbox is not added twice).
        :return: the updated job, or None when ``when`` said no or the job does not exist.
        """
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_uuid = ?", (job_uuid,)).fetchone()
            if row is None or not when(_job(row)):
                return None
            fields = change(_job(row))
            unknown = set(fields) - _SETTABLE
            if unknown:
                raise ValueError(f"cannot set job columns {sorted(unknown)}")
            if fields:
                cols = ", ".join(f"{k} = ?" for k in fields)
                values = [
                    _dumps(v) if k in _JSON_COLUMNS and v is not None else v
                    for k, v in fields.items()
                ]
                conn.execute(
                    f"UPDATE jobs SET {cols}, updated_at = ? WHERE job_uuid = ?",
                    (*values, time.time(), job_uuid),
                )
            job = _job(
                conn.execute("SELECT * FROM jobs WHERE job_uuid = ?", (job_uuid,)).fetchone()
            )
            if emit is not None:
                event = emit(job)
                if event is not None:
                    self._add_event(conn, event)
            return job

    def claim_next(self, owner: str, limit: int | None, now: float) -> Job | None:
        """Claim the oldest queued job for ``owner`` if fewer than ``limit`` jobs are active.

        Strict FIFO: when the oldest queued job waits for a submit retry, nothing overtakes it.
        One read decides first whether there can be anything to claim, so idle workers polling
        for work take no write lock; a limit of 0 (a backend that starts nothing) reads nothing.
        """
        if limit is not None and limit <= 0:
            return None
        if limit is None:
            head = self._read(_CLAIMABLE, (JobState.queued,))
        else:
            head = self._read(_CLAIMABLE_UNDER_LIMIT, (*ACTIVE, JobState.queued))
        if not head or head[0]["next_submit_at"] > now:
            return None
        if limit is not None and head[0]["active"] >= limit:
            return None
        with self._tx() as conn:
            if limit is not None:
                active = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE
                ).fetchone()[0]
                if active >= limit:
                    return None
            row = conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND cancel_requested = 0 ORDER BY seq LIMIT 1",
                (JobState.queued,),
            ).fetchone()
            if row is None or row["next_submit_at"] > now:
                return None
            conn.execute(
                "UPDATE jobs SET state = ?, owner = ?, updated_at = ? WHERE seq = ?",
                (JobState.starting, owner, time.time(), row["seq"]),
            )
            return _job(conn.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone())

    def owned(self, owner: str) -> list[Job]:
        rows = self._read(
            "SELECT * FROM jobs WHERE owner = ? AND state IN (?, ?) ORDER BY seq", (owner, *ACTIVE)
        )
        return [_job(r) for r in rows]

    def take_over(self, job_uuid: str, old_owner: str | None, new_owner: str) -> bool:
        """Take over an active job whose owner is gone; False if someone else was quicker."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET owner = ?, updated_at = ? WHERE job_uuid = ? AND owner IS ?"
                " AND state IN (?, ?)",
                (new_owner, time.time(), job_uuid, old_owner, *ACTIVE),
            )
            return cur.rowcount == 1

    def release(self, owner: str) -> None:
        """Give up ownership of active jobs (on a graceful stop) so another worker adopts them."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET owner = NULL, updated_at = ? WHERE owner = ? AND state IN (?, ?)",
                (time.time(), owner, *ACTIVE),
            )

    # -- outbox --------------------------------------------------------------------------------

    def _add_event(
        self,
        conn: sqlite3.Connection,
        event: BaseCloudEvent,
        *,
        reply: bool = False,
        encoded: str | None = None,
    ) -> None:
        """Add an emitted event; ``reply``: it travels as the HTTP reply, not to the sink;
        ``encoded``: its structured-mode JSON, when the caller has it already."""
        subject = event.get_subject() or ""
        sink_done, local_done = self._born_done(reply)
        conn.execute(
            "INSERT OR IGNORE INTO outbox"
            " (event_id, job_uuid, type, event, created_at, sink_done, local_done)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.get_id(),
                subject,
                event.get_type(),
                encoded or JSON_FORMAT.write(event).decode(),  # structured mode, as event() reads
                time.time(),
                int(sink_done),
                int(local_done),
            ),
        )

    def _born_done(self, reply: bool) -> tuple[bool, bool]:
        return reply or not self.sink_delivery, not self.local_delivery

    def born_delivered(self, *, reply: bool = False) -> bool:
        """Whether an event emitted now is delivered as it is written: nobody else needs it.

        The writer then need not wake a delivery loop (there is nothing for it to do).
        """
        return all(self._born_done(reply))

    def event(self, event_id: str) -> dict[str, Any] | None:
        """A stored emitted event (structured-mode dict) by id."""
        rows = self._read("SELECT event FROM outbox WHERE event_id = ?", (event_id,))
        return json.loads(rows[0]["event"]) if rows else None

    def events(self, job_uuid: str | None = None) -> list[dict[str, Any]]:
        """Emitted events in emission order (all, or one job's)."""
        if job_uuid is None:
            rows = self._read("SELECT event FROM outbox ORDER BY seq")
        else:
            rows = self._read(
                "SELECT event FROM outbox WHERE job_uuid = ? ORDER BY seq", (job_uuid,)
            )
        return [json.loads(r["event"]) for r in rows]

    def claim_outbox(
        self, owner: str, *, now: float, lease_s: float, limit: int = 50
    ) -> list[OutboxRow]:
        """Lease undelivered events that are due, oldest first, at most the head one per job.

        A job's later events wait until its earlier ones are delivered, so a consumer never sees
        ``job.completed`` before ``job.started``. A lease that expires (its worker died) lets
        another worker retry the event.
        """
        due = self._read(
            "SELECT 1 FROM outbox WHERE (sink_done = 0 OR local_done = 0)"
            " AND next_attempt_at <= ? AND lease_until <= ? LIMIT 1",
            (now, now),
        )
        if not due:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                """
                SELECT * FROM outbox AS o
                WHERE (o.sink_done = 0 OR o.local_done = 0)
                  AND o.next_attempt_at <= ? AND o.lease_until <= ?
                  AND NOT EXISTS (
                      SELECT 1 FROM outbox AS p
                      WHERE p.job_uuid = o.job_uuid AND p.seq < o.seq
                        AND (p.sink_done = 0 OR p.local_done = 0))
                ORDER BY o.seq LIMIT ?
                """,
                (now, now, limit),
            ).fetchall()
            for r in rows:
                conn.execute(
                    "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE seq = ?",
                    (owner, now + lease_s, r["seq"]),
                )
        return [
            OutboxRow(
                seq=r["seq"],
                event_id=r["event_id"],
                job_uuid=r["job_uuid"],
                type=r["type"],
                event=json.loads(r["event"]),
                sink_done=bool(r["sink_done"]),
                local_done=bool(r["local_done"]),
                attempts=r["attempts"],
            )
            for r in rows
        ]

    def outbox_done(self, seq: int, *, sink: bool, local: bool) -> None:
        """Record delivery to the sink and/or the in-process subscribers; frees the lease."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE outbox SET sink_done = MAX(sink_done, ?), local_done = MAX(local_done, ?),"
                " attempts = 0, last_error = NULL, lease_owner = NULL, lease_until = 0"
                " WHERE seq = ?",
                (int(sink), int(local), seq),
            )

    def outbox_failed(
        self, seq: int, *, error: str, retry_at: float, sink: bool, local: bool
    ) -> None:
        """Record a failed attempt (keeping the parts that did succeed) and when to retry."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE outbox SET sink_done = MAX(sink_done, ?), local_done = MAX(local_done, ?),"
                " attempts = attempts + 1, last_error = ?, next_attempt_at = ?,"
                " lease_owner = NULL, lease_until = 0 WHERE seq = ?",
                (int(sink), int(local), error[:500], retry_at, seq),
            )

    def pending_events(self) -> int:
        """How many emitted events are not yet fully delivered."""
        return self._read("SELECT COUNT(*) AS n FROM outbox WHERE sink_done = 0 OR local_done = 0")[
            0
        ]["n"]
