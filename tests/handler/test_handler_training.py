"""Real gunicorn, real curl, real ``python -m pipelines run`` (KFP SubprocessRunner, torchtune
LoRA on the tiny model): from a request to a job.completed carrying real checkpoints, a cancel
of a real training, and a restart with queued jobs and an undelivered event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handler import contract, procs
from handler.jobstate import JobState
from handler.store import JobStore
from tests.handler.helpers import request_data
from tests.support.gunicorn import Gunicorn
from tests.support.http_client import curl
from tests.support.jobs import write_dataset
from tests.support.loopback import wait_for
from tests.support.otlp import OtlpReceiver
from tests.support.sink import Sink

JOB = contract.JOB_REQUESTED


@pytest.fixture
def env(tmp_path: Path, model_store: Path) -> dict[str, str]:
    return {
        "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
        "KFP_TRAINER_MODEL_STORE": str(model_store),
        "KFP_TRAINER_DATA_ROOTS": str(tmp_path),  # the tests write their datasets here
        "KFP_TRAINER_MODE": "local",
        "KFP_TRAINER_LOCAL_WORKERS": "1",
        "KFP_TRAINER_PROGRESS_INTERVAL_S": "0",
        "KFP_TRAINER_DELIVERY_BACKOFF_S": "0.2",
        "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S": "1",
        "KFP_TRAINER_CACHE_DIR": str(tmp_path / "model-cache"),
    }


def post(
    url: str, data: dict[str, Any], event_type: str = JOB, *headers: str
) -> tuple[int, dict, Any]:
    args = [
        *("-H", "ce-specversion: 1.0", "-H", f"ce-id: curl-{data['job_uuid']}"),
        *("-H", "ce-source: /curl", "-H", f"ce-type: {event_type}"),
        *("-H", "Content-Type: application/json"),
        *(arg for header in headers for arg in ("-H", header)),
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
        assert jobs["rs-2"].state == JobState.queued and jobs["rs-3"].state == JobState.queued
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


def _records(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file as JSON; fails naming the first line that is not."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name}:{number} is not JSON: {line[:300]}") from None
        assert isinstance(record, dict), f"{path.name}:{number}: {line[:300]}"
        missing = [f for f in ("ts", "level", "logger", "msg") if f not in record]
        assert not missing, f"{path.name}:{number} lacks {missing}: {line[:300]}"
        records.append(record)
    return records


CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def test_a_local_run_is_one_trace_in_one_log_format(env, tmp_path):
    """From a traced request to job.completed: the handler's, the run's and the tasks' spans
    join the caller's trace, and every log line (gunicorn, handler, KFP's runner, the tasks)
    is one JSON object with the common fields; the job's lines name the job and the trace."""
    dataset = write_dataset(tmp_path / "train.jsonl", rows=8)
    request = request_data("logs-1", dataset)
    request["training_config"].update(n_epochs=2, max_steps_per_epoch=1)
    traceparent = f"ce-traceparent: 00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    with Sink() as sink, OtlpReceiver() as otlp:
        traced = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
        g = Gunicorn({**traced, "K_SINK": sink.url}, tmp_path / "gunicorn.log")
        try:
            g.wait_ready()
            status, headers, _ = post(g.url, request, JOB, traceparent)
            assert status == 200
            wait_for(lambda: "job.completed" in sink.types("logs-1"), 240, "logs-1 completed")
            otlp.wait_for_span("job ended")
        finally:
            assert g.stop() == 0
        spans = {s.name: s for s in otlp.trace(CALLER_TRACE)}
    # the reply and every emitted event carry the job's trace
    assert headers["ce-traceparent"].split("-")[1] == CALLER_TRACE
    for emitted in sink.of("logs-1"):
        assert emitted["traceparent"].split("-")[1] == CALLER_TRACE, emitted["type"]
    accepted = spans["job.requested"]
    assert accepted.parent_span_id == CALLER_SPAN and accepted.service == "kfp-trainer-handler"
    assert spans["submit"].parent_span_id == spans["job ended"].parent_span_id == accepted.span_id
    assert spans["job ended"].attributes["status"] == "completed"
    assert spans["local run"].parent_span_id == spans["submit"].span_id
    assert spans["train"].parent_span_id == spans["local run"].span_id
    completed = sink.of("logs-1")[-1]
    assert completed["traceparent"].split("-")[2] == spans["job ended"].span_id

    served = _records(g.log)
    assert {"gunicorn.error", "gunicorn.access", "handler.service"} <= {r["logger"] for r in served}
    queued = [r for r in served if r["msg"] == "job queued"]
    assert [(r["job_uuid"], r["trace_id"]) for r in queued] == [("logs-1", CALLER_TRACE)]
    run = _records(tmp_path / "state" / "jobs" / "logs-1" / "run.log")
    loggers = {r["logger"] for r in run}
    # the run process, KFP's own runner lines, the train task and the exit task
    assert {"pipelines.local", "pipelines.kfp", "pipelines.recipe", "pipelines.notify"} <= loggers
    strays = [r for r in run if r.get("job_uuid") != "logs-1"]
    assert not strays, strays[:3]
    in_tasks = [r for r in run if r["logger"] in ("pipelines.recipe", "pipelines.notify")]
    assert {r.get("trace_id") for r in in_tasks} == {CALLER_TRACE}
