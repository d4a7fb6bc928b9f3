"""Real gunicorn, real curl, real ``python -m pipelines run`` (KFP SubprocessRunner, torchtune
LoRA on the tiny model): from a request to a job.completed carrying real checkpoints, a cancel
of a real training, and a restart with queued jobs and an undelivered event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handler import contract, procs
from handler.store import QUEUED, JobStore
from tests.handler.helpers import request_data
from tests.support.gunicorn import Gunicorn
from tests.support.http_client import curl
from tests.support.jobs import write_dataset
from tests.support.loopback import wait_for
from tests.support.sink import Sink

JOB = contract.JOB_REQUESTED


@pytest.fixture
def env(tmp_path: Path, model_store: Path) -> dict[str, str]:
    return {
        "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
        "KFP_TRAINER_MODEL_STORE": str(model_store),
        "KFP_TRAINER_MODE": "local",
        "KFP_TRAINER_LOCAL_WORKERS": "1",
        "KFP_TRAINER_PROGRESS_INTERVAL_S": "0",
        "KFP_TRAINER_DELIVERY_BACKOFF_S": "0.2",
        "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S": "1",
        "KFP_TRAINER_CACHE_DIR": str(tmp_path / "model-cache"),
    }


def post(url: str, data: dict[str, Any], event_type: str = JOB) -> tuple[int, dict, Any]:
    args = [
        *("-H", "ce-specversion: 1.0", "-H", f"ce-id: curl-{data['job_uuid']}"),
        *("-H", "ce-source: /curl", "-H", f"ce-type: {event_type}"),
        *("-H", "Content-Type: application/json"),
    ]
    status, headers, body = curl("-X", "POST", url + "/", *args, "--data-binary", json.dumps(data))
    return status, headers, json.loads(body)


def status_of(url: str, job_uuid: str) -> str | None:
    code, _, body = curl(url + f"/jobs/{job_uuid}")
    return json.loads(body)["status"] if code == 200 else None


def test_curl_request_to_job_completed_with_real_checkpoints(env, tmp_path):
    dataset = write_dataset(tmp_path / "train.jsonl", rows=8)
    with Sink() as sink:
        g = Gunicorn({**env, "K_SINK": sink.url}, tmp_path / "gunicorn.log")
        try:
            g.wait_ready()
            status, headers, body = post(g.url, request_data("train-1", dataset))
            assert status == 200, body
            assert headers["ce-type"] == contract.JOB_SCHEDULED
            wait_for(lambda: "job.completed" in sink.types("train-1"), 240, "train-1 completed")
        finally:
            assert g.stop() == 0
    types = sink.types("train-1")
    assert types[0] == "job.started" and types[-1] == "job.completed"
    done = sink.of("train-1")[-1]["data"]
    assert done["status"] == "completed" and done["error"] is None
    assert done["dataset_rows"] == 8
    assert done["rows_without_trainable_tokens"] == 0  # every row fits the sequence limit
    assert done["resources_allocated"]["device"] == "cpu"
    (ckpt,) = done["checkpoints"]
    assert ckpt["identifier"] == "llama3.2-tiny-sft-0"
    assert ckpt["post_training_job_id"] == "train-1"
    assert ckpt["training_metrics"]["train_loss"] > 0
    path = Path(ckpt["path"])
    assert path.is_relative_to(tmp_path / "state" / "jobs" / "train-1")
    assert any(path.rglob("*adapter*")), f"no adapter files under {path}"


def test_cancel_a_real_training(env, tmp_path):
    dataset = write_dataset(tmp_path / "train.jsonl", rows=64)
    long = request_data("long-1", dataset)
    long["training_config"].update(n_epochs=50, max_steps_per_epoch=32)
    with Sink() as sink:
        g = Gunicorn({**env, "K_SINK": sink.url}, tmp_path / "gunicorn.log")
        try:
            g.wait_ready()
            assert post(g.url, long)[0] == 200
            wait_for(lambda: "job.progress" in sink.types("long-1"), 120, "training to progress")
            state = JobStore(tmp_path / "state" / "handler.sqlite3").backend_state("long-1")
            status, _, body = post(g.url, {"job_uuid": "long-1"}, contract.JOB_CANCEL_REQUESTED)
            assert status == 202 and body["status"] in ("cancelling", "cancelled")
            wait_for(lambda: "job.cancelled" in sink.types("long-1"), 60, "job.cancelled")
        finally:
            assert g.stop() == 0
    assert not procs.alive(state["token"])
    assert "job.completed" not in sink.types("long-1")


def test_restart_with_queued_jobs_and_an_undelivered_event(env, tmp_path):
    dataset = write_dataset(tmp_path / "train.jsonl", rows=8)
    db = tmp_path / "state" / "handler.sqlite3"
    names = ("rs-1", "rs-2", "rs-3")
    with Sink() as sink:
        sink.fail = True  # the sink is down: job.started of rs-1 stays in the outbox
        env = {**env, "K_SINK": sink.url}
        first = Gunicorn(env, tmp_path / "first.log")
        try:
            first.wait_ready()
            for name in names:
                assert post(first.url, request_data(name, dataset))[0] == 200
            wait_for(lambda: status_of(first.url, "rs-1") == "in_progress", 120, "rs-1 running")
            wait_for(lambda: sink.attempts >= 1, 30, "a failed delivery")
        finally:
            assert first.stop() == 0
        store = JobStore(db)
        jobs = {j.job_uuid: j for j in store.jobs()}
        assert jobs["rs-2"].state == QUEUED and jobs["rs-3"].state == QUEUED
        assert store.pending_events() >= 1
        pid_before = store.backend_state("rs-1")["pid"]
        store.close()

        sink.fail = False
        second = Gunicorn(env, tmp_path / "second.log")
        try:
            second.wait_ready()
            wait_for(
                lambda: all("job.completed" in sink.types(n) for n in names),
                300,
                "all three jobs completed after the restart",
            )
            assert status_of(second.url, "rs-3") == "completed"
        finally:
            assert second.stop() == 0
    for name in names:
        types = sink.types(name)
        assert types.count("job.started") == 1, (name, types)
        assert types[0] == "job.started" and types[-1] == "job.completed", (name, types)
        assert sink.of(name)[-1]["data"]["checkpoints"], name
    store = JobStore(db)
    assert store.backend_state("rs-1")["pid"] == pid_before  # rs-1 ran once, not restarted
    assert store.pending_events() == 0
