"""Real gunicorn (2 workers, handler/gunicorn_conf.py) on 127.0.0.1, driven by real curl.

The local backend runs tests/handler/fake_pipeline_run.py here, so every case is quick; the
real pipeline behind the same gunicorn is in test_handler_training.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handler import contract
from handler.store import JobStore
from tests.handler.conftest import FAKE_BACKEND
from tests.handler.helpers import request_data
from tests.support.gunicorn import Gunicorn
from tests.support.http_client import ce_headers, curl, header_args
from tests.support.loopback import wait_for
from tests.support.sink import Sink

JOB = contract.JOB_REQUESTED


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store) -> Iterator[tuple[Gunicorn, Sink, Path]]:
    base = tmp_path_factory.mktemp("http")
    with Sink() as sink:
        env = {
            "KFP_TRAINER_STATE_DIR": str(base / "state"),
            "KFP_TRAINER_MODEL_STORE": str(model_store),
            # Datasets are written by other fixtures under the session's temp dir.
            "KFP_TRAINER_DATA_ROOTS": str(tmp_path_factory.getbasetemp()),
            "KFP_TRAINER_BACKEND": FAKE_BACKEND,
            "KFP_TRAINER_LOCAL_WORKERS": "1",
            "KFP_TRAINER_MAX_BODY_BYTES": "4096",
            "KFP_TRAINER_PROGRESS_INTERVAL_S": "0",
            "KFP_TRAINER_DELIVERY_BACKOFF_S": "0.1",
            "K_SINK": sink.url,
        }
        g = Gunicorn(env, base / "gunicorn.log", workers=2)
        try:
            g.wait_ready()
            yield g, sink, base
        finally:
            code = g.stop()
        assert code == 0, f"gunicorn did not stop cleanly:\n{g.log.read_text()[-2000:]}"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from tests.support.jobs import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


def fake(job_uuid: str, dataset: Path, **cfg: Any) -> dict[str, Any]:
    return request_data(job_uuid, dataset, logger_config={"fake": cfg})


def post_binary(url: str, data: Any, event_type: str = JOB, **headers: str):
    event_id = f"curl-{data.get('job_uuid', 'x') if isinstance(data, dict) else 'x'}"
    hdrs = {**ce_headers(event_type, event_id, source="/curl"), **headers}
    body = data if isinstance(data, str) else json.dumps(data)
    return curl("-X", "POST", url + "/", *header_args(hdrs), "--data-binary", body)


def job_status(url: str, job_uuid: str) -> dict[str, Any] | None:
    status, _, body = curl(url + f"/jobs/{job_uuid}")
    return json.loads(body) if status == 200 else None


def test_binary_mode_request_is_scheduled_and_completes(server, data_file):
    g, sink, _ = server
    status, headers, body = post_binary(g.url, fake("bin-1", data_file))
    assert status == 200
    assert headers["ce-type"] == contract.JOB_SCHEDULED
    assert headers["ce-id"] == "bin-1/job.scheduled"
    assert headers["ce-source"] == "/kfp-trainer/handler"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "scheduled"
    wait_for(lambda: "job.completed" in sink.types("bin-1"), 30, "bin-1 completed at the sink")
    done = sink.of("bin-1")[-1]["data"]
    assert done["checkpoints"][0]["post_training_job_id"] == "bin-1"
    assert job_status(g.url, "bin-1")["status"] == "completed"


def test_a_request_naming_etc_passwd_is_a_400_over_http(server, data_file):
    g, _, _ = server
    data = {**fake("passwd-1", data_file), "dataset": {"uri": "file:///etc/passwd"}}
    status, _, body = post_binary(g.url, data)
    assert status == 400
    message = json.loads(body)["message"]
    assert message.startswith("dataset.uri: 'file:///etc/passwd' is outside the allowed roots (")
    assert "KFP_TRAINER_DATA_ROOTS" in message
    assert job_status(g.url, "passwd-1") is None


def test_structured_mode_request(server, data_file, tmp_path):
    g, sink, _ = server
    message = contract.to_http(
        contract.make_event(JOB, "/curl", fake("str-1", data_file)), structured=True
    )
    path = tmp_path / "event.json"
    path.write_bytes(message.body)
    status, headers, body = curl(
        "-X",
        "POST",
        g.url + "/",
        "-H",
        "Content-Type: application/cloudevents+json",
        "--data-binary",
        f"@{path}",
    )
    assert status == 200
    assert headers["ce-type"] == contract.JOB_SCHEDULED  # the reply is binary mode
    assert json.loads(body)["job_uuid"] == "str-1"
    wait_for(lambda: "job.completed" in sink.types("str-1"), 30, "str-1 completed")


def test_redelivery_gets_the_same_reply_and_one_run(server, data_file):
    g, sink, base = server
    data = fake("redo-1", data_file, steps=5, step_s=0.1)
    first = post_binary(g.url, data)
    second = post_binary(g.url, data)  # likely answered by the other worker
    assert first[0] == second[0] == 200
    assert first[2] == second[2]
    assert first[1]["ce-id"] == second[1]["ce-id"]
    wait_for(lambda: "job.completed" in sink.types("redo-1"), 30, "redo-1 completed")
    third = post_binary(g.url, data)
    assert third[2] == first[2]
    starts = base / "state" / "jobs" / "redo-1" / "work" / "starts.log"
    assert len(starts.read_text().splitlines()) == 1
    assert sink.types("redo-1").count("job.started") == 1


def test_changed_redelivery_is_400(server, data_file):
    g, _, _ = server
    assert post_binary(g.url, fake("chg-1", data_file))[0] == 200
    status, _, body = post_binary(g.url, fake("chg-1", data_file, steps=9))
    assert status == 400
    assert "already requested with different content" in json.loads(body)["message"]


def test_cancel_running_and_queued_jobs(server, data_file):
    g, sink, _ = server
    assert post_binary(g.url, fake("can-run", data_file, steps=600, step_s=0.1))[0] == 200
    assert post_binary(g.url, fake("can-queued", data_file))[0] == 200
    wait_for(
        lambda: (job_status(g.url, "can-run") or {}).get("status") == "in_progress",
        30,
        "can-run to run",
    )
    status, _, body = post_binary(g.url, {"job_uuid": "can-queued"}, contract.JOB_CANCEL_REQUESTED)
    assert (status, json.loads(body)) == (202, {"job_uuid": "can-queued", "status": "cancelled"})
    status, _, body = post_binary(g.url, {"job_uuid": "can-run"}, contract.JOB_CANCEL_REQUESTED)
    assert status == 202
    assert json.loads(body)["status"] in ("cancelling", "cancelled")
    wait_for(lambda: "job.cancelled" in sink.types("can-run"), 30, "can-run cancelled")
    wait_for(lambda: "job.cancelled" in sink.types("can-queued"), 10, "can-queued cancelled")
    assert "job.started" not in sink.types("can-queued")
    status, _, body = post_binary(g.url, {"job_uuid": "ghost"}, contract.JOB_CANCEL_REQUESTED)
    assert (status, json.loads(body)["message"]) == (400, "unknown job 'ghost': nothing to cancel")


BAD_REQUESTS = [
    # (id, curl arguments after the URL, status, start of the message)
    (
        "plain-json",
        ["-H", "Content-Type: application/json", "--data-binary", '{"job_uuid": "x"}'],
        400,
        "not a CloudEvent; this endpoint expects one CloudEvent",
    ),
    (
        "missing-attributes",
        ["-H", "ce-type: " + JOB, "-H", "Content-Type: application/json", "--data-binary", "{}"],
        400,
        "missing CloudEvent attribute header(s): ce-specversion, ce-id, ce-source",
    ),
    (
        "structured-not-json",
        ["-H", "Content-Type: application/cloudevents+json", "--data-binary", "{oops"],
        400,
        "body is not valid JSON",
    ),
    (
        "unknown-type",
        [
            *("-H", "ce-specversion: 1.0", "-H", "ce-id: 1", "-H", "ce-source: /c"),
            *("-H", "ce-type: com.example.nope", "-H", "Content-Type: application/json"),
            *("--data-binary", "{}"),
        ],
        400,
        "unknown event type 'com.example.nope'",
    ),
    (
        "batch",
        ["-H", "Content-Type: application/cloudevents-batch+json", "--data-binary", "[]"],
        415,
        "batch mode (application/cloudevents-batch+json) is not supported",
    ),
    (
        "text-plain",
        ["-H", "Content-Type: text/plain", "--data-binary", "hello"],
        415,
        "Content-Type 'text/plain' is not supported",
    ),
]


@pytest.mark.parametrize(
    ("args", "status", "message"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests(server, args, status, message):
    g, _, _ = server
    got, headers, body = curl("-X", "POST", g.url + "/", *args)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["message"].startswith(message)


def test_schema_violation_names_the_field(server, data_file):
    g, _, _ = server
    data = fake("schema-1", data_file)
    data["algorithm_config"]["lora_attn_modules"] = ["q_proj", "nope_proj"]
    status, _, body = post_binary(g.url, data)
    assert status == 400
    assert "algorithm_config.lora_attn_modules[1]: 'nope_proj' is not one of" in body.decode()


def test_config_problem_from_the_pipeline_checks(server, data_file):
    g, _, _ = server
    status, _, body = post_binary(
        g.url,
        fake(
            "cfg-1",
            data_file,
        )
        | {"model": "GPT-7"},
    )
    assert status == 400
    assert json.loads(body)["message"].startswith("model: unknown model 'GPT-7'")


def test_body_over_the_limit(server, data_file, tmp_path):
    g, _, _ = server
    big = fake("big-1", data_file) | {"logger_config": {"pad": "x" * 5000}}
    status, _, body = post_binary(g.url, big)
    assert status == 413
    assert "the limit is 4096 bytes" in json.loads(body)["message"]
    # Chunked, so gunicorn sees no Content-Length: the handler counts the bytes itself.
    path = tmp_path / "big.json"
    path.write_text(json.dumps(big))
    hdrs = ["-H", "ce-specversion: 1.0", "-H", "ce-id: b", "-H", "ce-source: /c"]
    hdrs += ["-H", f"ce-type: {JOB}", "-H", "Content-Type: application/json"]
    status, _, body = curl(
        "-X",
        "POST",
        g.url + "/",
        *hdrs,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{path}",
    )
    assert status == 413
    assert json.loads(body)["message"] == (
        "request body is 4097 bytes; the limit is 4096 bytes (KFP_TRAINER_MAX_BODY_BYTES). "
        "Datasets and models travel by URI, not inline"
    )


def test_status_routes(server):
    g, _, _ = server
    assert curl(g.url + "/healthz")[0] == 200
    status, _, body = curl(g.url + "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready", "mode": "local"})
    status, _, body = curl(g.url + "/jobs")
    assert status == 200 and isinstance(json.loads(body)["jobs"], list)
    status, _, body = curl(g.url + "/jobs/nope")
    assert (status, json.loads(body)["error"]) == (404, "not_found")


def test_logs_are_json_lines_with_access_records(server):
    g, _, _ = server
    curl(g.url + "/healthz?probe=1")
    wait_for(
        lambda: any(
            r.get("path") == "/healthz" and r.get("query") == "probe=1" for r in g.log_lines()
        ),
        10,
        "the access record",
    )
    lines = [ln for ln in g.log.read_text().splitlines() if ln.strip()]
    bad = [ln for ln in lines if not ln.startswith("{")]
    assert not bad, f"non-JSON log lines: {bad[:3]}"
    access = [r for r in g.log_lines() if r.get("logger") == "gunicorn.access"]
    assert {"method", "path", "status", "duration_ms"} <= set(access[-1])
    assert any(r.get("msg") == "job queued" and r.get("job_uuid") for r in g.log_lines())


def test_both_workers_serve_and_share_one_store(server):
    g, _, base = server
    workers = {r["owner"] for r in g.log_lines() if r.get("msg") == "handler service started"}
    assert len(workers) == 2
    jobs = JobStore(base / "state" / "handler.sqlite3").jobs()
    assert len({j.job_uuid for j in jobs}) == len(jobs)
