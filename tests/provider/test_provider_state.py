"""The provider's job store: one mapping of states, merge rules, persistence, one writer."""

from __future__ import annotations

import asyncio
import threading

import pytest
from llama_stack.apis.common.job_types import JobStatus
from llama_stack.providers.utils.kvstore.config import SqliteKVStoreConfig

from provider.state import JobStore, merge, to_job_status


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("scheduled", JobStatus.scheduled),
        ("in_progress", JobStatus.in_progress),
        ("completed", JobStatus.completed),
        ("failed", JobStatus.failed),
        ("cancelled", JobStatus.cancelled),
    ],
)
def test_every_contract_state_maps(value: str, expected: JobStatus) -> None:
    assert to_job_status(value) is expected


def test_unknown_state_is_named() -> None:
    with pytest.raises(ValueError, match="unknown job status 'RUNNING'"):
        to_job_status("RUNNING")


def test_contract_states_are_all_covered() -> None:
    from handler.contract import JobStatus as ContractStatus

    assert {to_job_status(s.value).value for s in ContractStatus} == {s.value for s in JobStatus}


def _u(status: str, **fields) -> dict:
    return {"job_uuid": "j1", "status": status, **fields}


def test_merge_moves_forward_and_keeps_fields() -> None:
    r = merge(None, _u("scheduled", scheduled_at="2026-01-01T00:00:00+00:00"))
    r = merge(r, _u("in_progress", started_at="2026-01-01T00:00:01+00:00", progress={"step": 1}))
    r = merge(r, _u("in_progress", progress={"step": 3, "total_steps": 4}))
    assert r["status"] == "in_progress"
    assert r["progress"] == {"step": 3, "total_steps": 4}
    assert r["scheduled_at"].startswith("2026-01-01T00:00:00")
    r = merge(r, _u("completed", checkpoints=[{"path": "/x"}], completed_at="t2"))
    assert (r["status"], r["checkpoints"], r["completed_at"]) == (
        "completed",
        [{"path": "/x"}],
        "t2",
    )


def test_late_or_repeated_updates_never_move_backwards() -> None:
    r = merge(None, _u("in_progress", progress={"step": 5}))
    r = merge(r, _u("scheduled", scheduled_at="t0"))
    assert r["status"] == "in_progress"
    assert r["scheduled_at"] == "t0"  # a missing field is still filled in
    r = merge(r, _u("in_progress", progress={"step": 2}))
    assert r["progress"] == {"step": 5}
    r = merge(r, _u("cancelled", completed_at="t9"))
    r = merge(r, _u("completed", checkpoints=[{"path": "/late"}]))
    r = merge(r, _u("in_progress"))
    assert r["status"] == "cancelled"
    assert r["completed_at"] == "t9"


def _store(tmp_path) -> JobStore:
    store = JobStore(SqliteKVStoreConfig(db_path=str(tmp_path / "jobs.db")))
    store.start()
    return store


def test_store_survives_reopen_and_rejects_duplicates(tmp_path) -> None:
    store = _store(tmp_path)

    async def first() -> None:
        assert await store.create({"job_uuid": "a", "status": "scheduled", "requested_at": "1"})
        assert not await store.create({"job_uuid": "a", "status": "scheduled"})
        await store.apply(_u("completed", job_uuid="a", checkpoints=[{"path": "/c"}]))
        assert await store.create({"job_uuid": "b", "status": "scheduled", "requested_at": "2"})

    asyncio.run(first())
    store.stop()

    again = _store(tmp_path)

    async def second() -> None:
        assert [r["job_uuid"] for r in await again.all()] == ["a", "b"]
        record = await again.get("a")
        assert record["status"] == "completed"
        assert record["checkpoints"] == [{"path": "/c"}]
        assert await again.get("nope") is None
        await again.delete("b")
        assert [r["job_uuid"] for r in await again.all()] == ["a"]

    asyncio.run(second())
    again.stop()


def test_updates_from_many_threads_are_applied_in_order_without_loss(tmp_path) -> None:
    store = _store(tmp_path)

    def feed(job: str) -> None:
        for step in range(1, 31):
            store.apply_soon({"job_uuid": job, "status": "in_progress", "progress": {"step": step}})
        store.apply_soon({"job_uuid": job, "status": "completed", "checkpoints": [{"p": job}]})

    threads = [threading.Thread(target=feed, args=(f"job{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    store.stop()  # drains what is queued
    again = _store(tmp_path)
    records = asyncio.run(again.all())
    again.stop()
    assert len(records) == 4
    for record in records:
        assert record["status"] == "completed"
        assert record["progress"] == {"step": 30}
        assert record["checkpoints"] == [{"p": record["job_uuid"]}]
