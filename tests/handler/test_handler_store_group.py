"""Group commit in the job store: concurrent inserts of one process share a durable commit."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from handler import contract
from handler.store import JobStore, StoreUnavailable, new_job


def _insert(store: JobStore, job_uuid: str, digest: str = "d"):
    job = new_job(
        job_uuid=job_uuid, digest=digest, request={"job_uuid": job_uuid}, scheduled_at="t"
    )
    return store.insert_job(job, contract.make_event(contract.JOB_SCHEDULED, "/t", job.to_status()))


def _wal_frames(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        conn.close()


def _insert_while_locked(store: JobStore, db: Path, uuids: list[str], hold_s: float) -> list:
    """Insert ``uuids`` from one thread each while another connection holds the write lock."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    results: list[object] = [None] * len(uuids)

    def run(i: int) -> None:
        try:
            results[i] = _insert(store, uuids[i])
        except StoreUnavailable as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(uuids))]
    for t in threads:
        t.start()
    time.sleep(hold_s)
    holder.execute("ROLLBACK")
    holder.close()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_inserts_share_commits_and_each_is_stored_once(tmp_path):
    one_by_one, grouped = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    uuids = [f"job-{i}" for i in range(16)]
    store = JobStore(one_by_one)
    for u in uuids:
        _insert(store, u)
    frames_one_by_one = _wal_frames(one_by_one)  # while open: the last close removes the WAL
    store.close()

    store = JobStore(grouped, busy_timeout_s=10)
    store.ping()  # schema in place before the lock is taken
    results = _insert_while_locked(store, grouped, [*uuids, "job-0"], hold_s=0.5)

    created = {}
    for u, (job, new) in zip([*uuids, "job-0"], results, strict=True):
        assert job.job_uuid == u
        created[u] = created.get(u, 0) + new
    assert created == dict.fromkeys(uuids, 1)  # job-0, sent twice at once, is created once
    # Threads started in order need not reach the group in that order: compare as sets.
    assert sorted(j.job_uuid for j in store.jobs()) == sorted(uuids)
    assert sorted(e["id"] for e in store.events()) == sorted(f"{u}/job.scheduled" for u in uuids)
    # Sixteen commits one by one write far more WAL frames than the one or two commits that
    # sixteen waiting threads share.
    assert 0 < _wal_frames(grouped) * 2 < frames_one_by_one


def test_a_failed_group_commit_fails_every_caller_and_stores_nothing(tmp_path):
    db = tmp_path / "h.sqlite3"
    store = JobStore(db, busy_timeout_s=0.3)
    store.ping()
    results = _insert_while_locked(store, db, [f"job-{i}" for i in range(4)], hold_s=1.5)

    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert "not writable now" in str(results[-1])
    assert store.jobs() == []
    job, created = _insert(store, "job-later")  # the failed group is gone: writes work again
    assert created and job.job_uuid == "job-later"
