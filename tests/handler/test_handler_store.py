"""The SQLite job store: atomic claims across processes, FIFO, one event per fact, outbox order."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from handler import contract
from handler.jobstate import JobState
from handler.store import JobStore, new_job


def _scheduled(job):
    return contract.make_event(contract.JOB_SCHEDULED, "/t", job.to_status())


def _queue(store: JobStore, n: int, prefix: str = "job") -> list[str]:
    uuids = [f"{prefix}-{i}" for i in range(n)]
    for u in uuids:
        job = new_job(job_uuid=u, digest="d", request={"job_uuid": u}, scheduled_at="2026-01-01")
        store.insert_job(job, _scheduled(job))
    return uuids


def _claim_all(db: str, owner: str, limit: int, out) -> None:
    """Run in a separate process: claim as many jobs as the limit allows."""
    store = JobStore(Path(db), busy_timeout_s=10)
    claimed = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        job = store.claim_next(owner, limit, time.time())
        if job is not None:
            claimed.append(job.job_uuid)
    out.put((owner, claimed))


def test_claims_across_processes_respect_the_limit_and_the_order(tmp_path):
    db = tmp_path / "h.sqlite3"
    store = JobStore(db)
    uuids = _queue(store, 6)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(db), f"w{i}", 2, out)) for i in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [u for _, got in results for u in got]
    assert sorted(claimed) == uuids[:2]  # two at most, and the two oldest
    assert [j.state for j in store.jobs()] == ["starting"] * 2 + [JobState.queued] * 4


def test_claim_is_strictly_fifo_behind_a_job_waiting_for_retry(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    first, _ = _queue(store, 2)
    store.update(first, when=lambda j: True, change=lambda j: {"next_submit_at": time.time() + 60})
    assert store.claim_next("w", None, time.time()) is None


def test_a_write_as_the_first_touch_makes_the_stores_directory(tmp_path):
    """An accepted job can be a process's first use of its store, before any thread has opened
    a connection (which also makes the directory): the insert must not fail on the lock file."""
    store = JobStore(tmp_path / "not-yet" / "h.sqlite3")
    _queue(store, 1)
    assert store.job("job-0") is not None
    assert (tmp_path / "not-yet" / "h.sqlite3.lock").exists()


def test_insert_is_idempotent_and_the_scheduled_event_is_born_sink_delivered(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    _queue(store, 1)
    again = new_job(job_uuid="job-0", digest="other", request={}, scheduled_at="2026-01-02")
    job, created = store.insert_job(again, _scheduled(again))
    assert not created
    assert job.digest == "d"
    rows = store.claim_outbox("w", now=time.time(), lease_s=60)
    assert [(r.event_id, r.sink_done, r.local_done) for r in rows] == [
        ("job-0/job.scheduled", True, False)
    ]


def test_update_emits_once_and_only_when_allowed(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    (u,) = _queue(store, 1)

    def finish():
        return store.update(
            u,
            when=lambda j: not j.terminal,
            change=lambda j: {"state": "completed"},
            emit=lambda j: contract.make_event(contract.JOB_COMPLETED, "/t", j.to_status()),
        )

    assert finish() is not None
    assert finish() is None
    types = [e["type"] for e in store.events(u)]
    assert types == [contract.JOB_SCHEDULED, contract.JOB_COMPLETED]


def test_update_refuses_unknown_columns(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    (u,) = _queue(store, 1)
    with pytest.raises(ValueError, match="cannot set job columns"):
        store.update(u, when=lambda j: True, change=lambda j: {"digest": "x"})


def test_outbox_holds_a_jobs_later_events_behind_an_undelivered_one(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    a, b = _queue(store, 2)
    for u in (a, b):
        store.update(
            u,
            when=lambda j: True,
            change=lambda j: {"state": JobState.running},
            emit=lambda j: contract.make_event(contract.JOB_STARTED, "/t", j.to_status()),
        )
    rows = store.claim_outbox("w", now=time.time(), lease_s=60)
    assert [r.event_id for r in rows] == [f"{a}/job.scheduled", f"{b}/job.scheduled"]
    # Leased rows are not handed out twice; the jobs' next events wait behind them.
    assert store.claim_outbox("v", now=time.time(), lease_s=60) == []
    store.outbox_failed(rows[0].seq, error="x", retry_at=time.time() + 60, sink=True, local=False)
    store.outbox_done(rows[1].seq, sink=True, local=True)
    rows = store.claim_outbox("w", now=time.time(), lease_s=60)
    assert [r.event_id for r in rows] == [f"{b}/job.started"]
    # An expired lease (its worker died) is handed out again.
    later = store.claim_outbox("v", now=time.time() + 120, lease_s=60)
    assert [r.event_id for r in later] == [f"{a}/job.scheduled", f"{b}/job.started"]
    assert later[0].attempts == 1


def test_an_unopenable_store_is_unavailable(tmp_path):
    from handler.store import StoreUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("")
    store = JobStore(blocker / "h.sqlite3")
    with pytest.raises(StoreUnavailable, match="cannot be opened"):
        store.ping()


@pytest.mark.parametrize(("sync", "pragma"), [("normal", 1), ("full", 2)])
def test_sync_setting_reaches_every_connection(tmp_path, sync, pragma):
    from handler.service import create_service
    from handler.settings import HandlerSettings

    settings = HandlerSettings.from_env(
        {"KFP_TRAINER_STATE_DIR": str(tmp_path), "KFP_TRAINER_DB_SYNC": sync}
    )
    store = create_service(settings).store
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == pragma
    store.close()


def test_an_unknown_sync_setting_is_refused_by_name():
    from handler.settings import HandlerSettings, SettingsError

    with pytest.raises(SettingsError, match=r"KFP_TRAINER_DB_SYNC='off': expected 'normal' or"):
        HandlerSettings.from_env({"KFP_TRAINER_DB_SYNC": "off"})


def test_queueing_without_subscribers_is_one_row_and_keeps_the_reply(tmp_path):
    store = JobStore(tmp_path / "h.sqlite3")
    store.sink_delivery = store.local_delivery = False  # HTTP mode, no K_SINK
    _queue(store, 2)
    assert store.events() == []  # nobody else needs job.scheduled: no outbox row
    assert store.scheduled_event("job-1")["id"] == "job-1/job.scheduled"
    store.close()


def _store_without(db: Path, column: str) -> None:
    """A store with one job, written as before ``column`` existed."""
    import sqlite3

    old = JobStore(db)  # with subscribers: job.scheduled is in the outbox too
    _queue(old, 1, "old")
    old.close()
    conn = sqlite3.connect(db)
    conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    conn.close()


def test_a_store_from_before_replies_lived_in_jobs_is_upgraded_in_place(tmp_path):
    db = tmp_path / "h.sqlite3"
    _store_without(db, "reply")

    store = JobStore(db)
    assert store.scheduled_event("old-0")["id"] == "old-0/job.scheduled"  # from the outbox
    store.sink_delivery = store.local_delivery = False
    _queue(store, 1, "new")
    assert store.scheduled_event("new-0")["id"] == "new-0/job.scheduled"
    store.close()


def _caller_job(u: str, caller: str):
    return new_job(
        job_uuid=u, digest="d", request={"job_uuid": u}, scheduled_at="2026-01-01", caller=caller
    )


def test_a_callers_cap_holds_under_concurrent_inserts_and_frees_when_a_job_ends(tmp_path):
    """The count and the insert are one statement, inside the group commit's transaction too:
    twelve threads of one caller racing for a cap of 3 get exactly three jobs."""
    import threading

    store = JobStore(tmp_path / "h.sqlite3")
    store.sink_delivery = store.local_delivery = False
    results: dict[str, bool] = {}
    barrier = threading.Barrier(12)

    def insert(u: str) -> None:
        job = _caller_job(u, "sa:a")
        barrier.wait()
        stored, created = store.insert_job(job, _scheduled(job), max_active=3)
        results[u] = stored is not None and created

    threads = [threading.Thread(target=insert, args=(f"c-{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    taken = sorted(u for u, ok in results.items() if ok)
    assert len(taken) == 3 and len(results) == 12
    other = _caller_job("other-1", "sa:b")
    assert store.insert_job(other, _scheduled(other), max_active=3)[1], "another caller's own cap"
    again = _caller_job(taken[0], "sa:a")
    stored, created = store.insert_job(again, _scheduled(again), max_active=3)
    assert stored is not None and stored.job_uuid == taken[0] and not created  # redelivery
    late = _caller_job("c-late", "sa:a")
    assert store.insert_job(late, _scheduled(late), max_active=3) == (None, False)
    store.update(taken[0], when=lambda j: True, change=lambda j: {"state": "cancelled"})
    stored, created = store.insert_job(late, _scheduled(late), max_active=3)
    assert created and stored.caller == "sa:a"
    assert store.job("c-late").caller == "sa:a"
    uncapped = _caller_job("c-free", "sa:a")
    assert store.insert_job(uncapped, _scheduled(uncapped))[1], "max_active=0: no cap"
    store.close()


def test_a_store_from_before_callers_were_kept_is_upgraded_in_place(tmp_path):
    db = tmp_path / "h.sqlite3"
    _store_without(db, "caller")
    store = JobStore(db)
    assert store.job("old-0").caller is None
    job = _caller_job("new-0", "sa:a")
    assert store.insert_job(job, _scheduled(job), max_active=1)[1]
    assert store.job("new-0").caller == "sa:a"
    store.close()
