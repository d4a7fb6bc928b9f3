"""The Flask app through its test client: the factory, each error class, redelivery, cancel."""

from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path

import pytest

from handler import EXTENSION, contract
from tests.handler.helpers import binary, cancel_message, request_data, requested_message
from tests.support.loopback import wait_for
from tests.support.s3 import FaultyS3, set_credentials

# -- the factory -----------------------------------------------------------------------------


def test_factory_honours_its_settings(make_app, env, tmp_path):
    app = make_app(env, KFP_TRAINER_SOURCE="/custom/source", KFP_TRAINER_MAX_BODY_BYTES="1234")
    service = app.extensions[EXTENSION]
    assert service.settings.source == "/custom/source"
    assert service.settings.max_body_bytes == 1234
    assert service.store.path == tmp_path / "state" / "handler.sqlite3"
    assert service.backend.name == "noop"


def test_two_apps_share_nothing(make_app, env, tmp_path, dataset):
    one = make_app(env)
    two = make_app(env, KFP_TRAINER_STATE_DIR=str(tmp_path / "other"))
    m = requested_message(request_data("only-in-one", dataset))
    assert one.test_client().post("/", headers=m.headers, data=m.body).status_code == 200
    assert two.test_client().get("/jobs/only-in-one").status_code == 404


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready", "mode": "local"}


def test_importing_handler_builds_nothing():
    import subprocess
    import sys

    code = (
        "import sys, handler, handler.contract, handler.settings, handler.backends.base;"
        "bad = [m for m in ('flask', 'torch', 'kfp', 'requests') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- accepted requests -----------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True], ids=["binary", "structured"])
def test_accepted_request_replies_job_scheduled_in_binary_mode(client, dataset, structured):
    m = requested_message(request_data("job-a", dataset), structured=structured)
    r = client.post("/", headers=m.headers, data=m.body)
    assert r.status_code == 200
    assert r.headers["ce-type"] == contract.JOB_SCHEDULED
    assert r.headers["ce-id"] == "job-a/job.scheduled"
    assert r.headers["ce-subject"] == "job-a"
    assert r.headers["Content-Type"] == "application/json"
    assert r.json["status"] == "scheduled"
    assert r.json["job_uuid"] == "job-a"


def test_model_artifact_is_resolved_from_the_model_store(client, service, dataset, model_store):
    m = requested_message(request_data("job-r", dataset))
    assert client.post("/", headers=m.headers, data=m.body).status_code == 200
    request = service.store.request("job-r")
    assert request["model_artifact"] == {"uri": str(model_store / "llama3.2-tiny")}


def test_redelivery_answers_the_same_reply_and_runs_once(client, service, dataset):
    m = requested_message(request_data("job-b", dataset))
    first = client.post("/", headers=m.headers, data=m.body)
    wait_for(lambda: service.job("job-b")["status"] == "completed", 10, "job-b to complete")
    again = client.post("/", headers=m.headers, data=m.body)
    assert again.status_code == 200
    assert again.data == first.data
    assert again.headers["ce-id"] == first.headers["ce-id"]
    assert again.headers["ce-time"] == first.headers["ce-time"]
    started = [e for e in service.store.events("job-b") if e["type"] == contract.JOB_STARTED]
    assert len(started) == 1


def test_same_job_uuid_with_different_content_is_400(client, dataset):
    m = requested_message(request_data("job-c", dataset))
    assert client.post("/", headers=m.headers, data=m.body).status_code == 200
    changed = requested_message(request_data("job-c", dataset, checkpoint_format="huggingface"))
    r = client.post("/", headers=changed.headers, data=changed.body)
    assert r.status_code == 400
    assert "job_uuid 'job-c' was already requested with different content" in r.json["message"]


def test_redelivery_is_answered_even_when_a_new_request_would_be_refused(client, dataset):
    """The first delivery's answer stands: a dataset gone since then refuses only new jobs."""
    m = requested_message(request_data("job-gone", dataset))
    first = client.post("/", headers=m.headers, data=m.body)
    assert first.status_code == 200
    dataset.unlink()
    again = client.post("/", headers=m.headers, data=m.body)
    assert (again.status_code, again.data) == (200, first.data)
    other = requested_message(request_data("job-new", dataset))
    r = client.post("/", headers=other.headers, data=other.body)
    assert r.status_code == 400
    assert f"dataset.uri: file {str(dataset)!r} does not exist" in r.json["message"], r.json


def test_a_resolved_model_is_reused_and_a_missing_one_is_looked_up_again(
    make_app, env, dataset, tmp_path, monkeypatch
):
    import pipelines.staging

    lookups: list[str] = []
    real = pipelines.staging.resolve_model_uri

    def counting(model: str, store: str) -> str:
        lookups.append(model)
        return real(model, store)

    monkeypatch.setattr(pipelines.staging, "resolve_model_uri", counting)
    store = tmp_path / "models"
    store.mkdir()
    client = make_app(env, KFP_TRAINER_MODEL_STORE=str(store)).test_client()
    for i in range(2):  # not there yet: each request looks again
        m = requested_message(request_data(f"miss-{i}", dataset))
        assert client.post("/", headers=m.headers, data=m.body).status_code == 400
    (store / "llama3.2-tiny").mkdir()  # uploaded now: the next request finds it
    for i in range(3):
        m = requested_message(request_data(f"hit-{i}", dataset))
        assert client.post("/", headers=m.headers, data=m.body).status_code == 200
    assert lookups == ["llama3.2-tiny"] * 3


# -- every class of bad request --------------------------------------------------------------

JOB = "io.llamastack.posttraining.job.requested"


def _post(client, headers, body):
    return client.post("/", headers=headers, data=body)


def test_plain_json_without_ce_headers_is_not_a_cloudevent(client):
    r = _post(client, {"Content-Type": "application/json"}, b'{"job_uuid": "x"}')
    assert r.status_code == 400
    assert r.json["error"] == "bad_request"
    assert r.json["message"].startswith("not a CloudEvent; this endpoint expects one CloudEvent")


def test_missing_attribute_headers_are_named(client, dataset):
    headers, body = binary(JOB, request_data("j", dataset))
    del headers["ce-source"], headers["ce-id"]
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert r.json["message"] == "missing CloudEvent attribute header(s): ce-id, ce-source"


def test_structured_event_missing_attributes(client):
    body = json.dumps({"specversion": "1.0", "type": JOB, "data": {}}).encode()
    r = _post(client, {"Content-Type": "application/cloudevents+json"}, body)
    assert r.status_code == 400
    assert r.json["message"] == "missing CloudEvent attribute(s): id, source"


def test_wrong_specversion(client, dataset):
    headers, body = binary(JOB, request_data("j", dataset))
    headers["ce-specversion"] = "0.3"
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert "ce-specversion '0.3' is not supported" in r.json["message"]


def test_invalid_time_attribute(client, dataset):
    headers, body = binary(JOB, request_data("j", dataset))
    headers["ce-time"] = "yesterday"
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert r.json["message"].startswith("not a valid CloudEvent")


def test_structured_body_that_is_not_json(client):
    r = _post(client, {"Content-Type": "application/cloudevents+json"}, b"{nope")
    assert r.status_code == 400
    assert r.json["message"].startswith("body is not valid JSON")


def test_binary_data_that_is_not_json(client):
    headers, _ = binary(JOB, {})
    r = _post(client, headers, b"{nope")
    assert r.status_code == 400
    assert r.json["message"].startswith("data is not valid JSON")


def test_missing_data(client):
    headers, _ = binary(JOB, {})
    r = _post(client, headers, b"")
    assert r.status_code == 400
    assert r.json["message"] == f"event data is missing: {JOB} needs a JSON object"


def test_unknown_event_type(client):
    headers, body = binary("com.example.other", {"x": 1})
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert r.json["message"].startswith("unknown event type 'com.example.other'; expected one of")


def test_schema_violations_name_every_field(client, dataset):
    data = request_data("j", dataset)
    del data["training_config"]
    data["algorithm_config"]["rank"] = 0
    headers, body = binary(JOB, data)
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert "algorithm_config.rank: 0 is less than the minimum of 1" in r.json["problems"]
    assert "(data): 'training_config' is a required property" in r.json["problems"]


def test_bad_job_uuid(client, dataset):
    headers, body = binary(JOB, request_data("bad uuid/with spaces", dataset))
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert r.json["message"].startswith("job_uuid: 'bad uuid/with spaces' does not match")


@pytest.mark.parametrize("job_uuid", [".", ".."])
@pytest.mark.parametrize("event_type", [JOB, contract.JOB_CANCEL_REQUESTED, contract.RUN_FINISHED])
def test_dot_segment_job_uuids_are_refused_by_the_contract(client, dataset, job_uuid, event_type):
    """'.' and '..' fit the id's characters, but /jobs/.. and jobs/../result.json name another
    place: refused by name, whichever event carries them, and never emitted."""
    data = request_data(job_uuid, dataset) if event_type == JOB else {"job_uuid": job_uuid}
    headers, body = binary(event_type, data)
    r = _post(client, headers, body)
    assert r.status_code == 400, r.json
    assert r.json["message"].startswith(f"job_uuid: {job_uuid!r} is not allowed: '.' and '..'")
    with pytest.raises(contract.ContractError, match="path segments"):
        contract.make_event(
            contract.JOB_COMPLETED, "/t", {"job_uuid": job_uuid, "status": "completed"}
        )
    assert contract.validate_data(JOB, request_data("...", dataset))["job_uuid"] == "..."


def test_subject_must_match_job_uuid(client, dataset):
    headers, body = binary(JOB, request_data("j1", dataset), subject="j2")
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert r.json["message"] == "subject 'j2' does not match data.job_uuid 'j1'"


def test_pipeline_config_problems_from_check_request(client, tmp_path, dataset):
    data = request_data("j", dataset, model="no-such-model")
    missing = tmp_path / "data" / "missing.jsonl"
    data["dataset"]["uri"] = str(missing)
    headers, body = binary(JOB, data)
    r = _post(client, headers, body)
    assert r.status_code == 400
    problems = r.json["problems"]
    assert any(p.startswith("model: unknown model 'no-such-model'") for p in problems)
    assert f"dataset.uri: file '{missing}' does not exist" in problems


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("dataset", "file:///etc/passwd"),
        ("dataset", "/etc/passwd"),
        ("validation_dataset", "{data}/../../../etc/passwd"),
        ("model_artifact", "{tmp}/elsewhere/llama3.2-tiny"),
        ("dataset", "s3://someone-elses-bucket/train.jsonl"),
        # A FIFO blocks whoever opens it for reading: this test would hang if anything did.
        ("dataset", "{tmp}/outside.fifo"),
    ],
)
def test_a_uri_outside_the_roots_is_refused_before_anything_is_opened(
    client, service, tmp_path, dataset, model_store, field, uri
):
    uri = uri.format(data=tmp_path / "data", tmp=tmp_path)
    if uri.endswith(".fifo"):
        os.mkfifo(uri)
    data = {**request_data("j-roots", dataset), field: {"uri": uri}}
    headers, body = binary(JOB, data)
    r = _post(client, headers, body)
    assert r.status_code == 400
    roots = f"{tmp_path / 'state'}, {model_store}, {tmp_path / 'data'}"
    assert r.json["message"] == (
        f"{field}.uri: {uri!r} is outside the allowed roots ({roots}); requests may only name "
        "files under these (add a directory or prefix to KFP_TRAINER_DATA_ROOTS to allow it)"
    )
    assert service.store.job("j-roots") is None


def test_unresolvable_model_names_model_and_store(client, dataset, model_store):
    headers, body = binary(JOB, request_data("j", dataset, model="Llama3.2-3B-Instruct"))
    r = _post(client, headers, body)
    assert r.status_code == 400
    message = r.json["message"]
    assert message.startswith("model_artifact: not given and not resolvable")
    assert "'Llama3.2-3B-Instruct' not found in model store" in message
    assert str(model_store) in message


@pytest.fixture
def faulty_s3_store(monkeypatch):
    """A model store in S3 whose endpoint answers every request with the given error."""
    set_credentials(monkeypatch, "testing", "testing")
    servers = []

    def start(status: int, code: str) -> str:
        server = FaultyS3(status, code).start()
        servers.append(server)
        monkeypatch.setenv("S3_ENDPOINT_URL", server.url)
        return "s3://models-bucket/store"

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_model_store_not_answering_is_503_and_nothing_is_recorded(
    make_app, env, dataset, faulty_s3_store, status, code
):
    store = faulty_s3_store(status, code)
    client = make_app(env, KFP_TRAINER_MODEL_STORE=store).test_client()
    headers, body = binary(JOB, request_data("j-s3-down", dataset))
    r = _post(client, headers, body)
    assert r.status_code == 503, r.json
    assert r.headers["Retry-After"] == "7"
    assert r.json["error"] == "unavailable"
    assert r.json["message"] == (
        f"model_artifact: not given, and model store {store!r} could not be searched for "
        "model 'llama3.2-tiny' right now; retry later"
    )
    assert "ce-type" not in r.headers
    assert client.get("/jobs/j-s3-down").status_code == 404


def test_model_store_refusing_is_400_naming_model_and_store(
    make_app, env, dataset, faulty_s3_store
):
    store = faulty_s3_store(403, "AccessDenied")
    client = make_app(env, KFP_TRAINER_MODEL_STORE=store).test_client()
    headers, body = binary(JOB, request_data("j-s3-no", dataset))
    r = _post(client, headers, body)
    assert r.status_code == 400, r.json
    message = r.json["message"]
    assert message.startswith(
        f"model_artifact: not given and not resolvable: cannot look up model 'llama3.2-tiny' "
        f"in model store {store!r}: "
    )
    assert "403" in message
    assert client.get("/jobs/j-s3-no").status_code == 404


def test_unsupported_training_is_named(client, dataset):
    data = request_data("j", dataset)
    data["algorithm_config"]["quantize_base"] = True
    headers, body = binary(JOB, data)
    r = _post(client, headers, body)
    assert r.status_code == 400
    assert "QLoRA (quantize_base=true) is not supported" in r.json["message"]


def test_body_over_the_limit_by_content_length(make_app, env, dataset):
    client = make_app(env, KFP_TRAINER_MAX_BODY_BYTES="500").test_client()
    headers, body = binary(JOB, request_data("j", dataset))
    assert len(body) > 500
    r = _post(client, headers, body)
    assert r.status_code == 413
    assert r.json["message"].startswith(f"request body is {len(body)} bytes; the limit is 500")


def test_body_over_the_limit_without_content_length(make_app, env, dataset):
    client = make_app(env, KFP_TRAINER_MAX_BODY_BYTES="500").test_client()
    headers, body = binary(JOB, request_data("j", dataset))

    # What gunicorn hands over for a chunked body: no Content-Length, a terminated stream.
    r = client.post(
        "/",
        headers={**headers, "Transfer-Encoding": "chunked"},
        input_stream=io.BytesIO(body),
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert r.request.content_length is None
    assert r.status_code == 413
    assert "the limit is 500 bytes" in r.json["message"]


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/plain", "Content-Type 'text/plain' is not supported; this endpoint expects"),
        ("application/cloudevents-batch+json", "batch mode (application/cloudevents-batch+json)"),
        ("application/x-www-form-urlencoded", "Content-Type 'application/x-www-form-urlencoded'"),
    ],
)
def test_unsupported_content_types(client, content_type, expected):
    r = _post(client, {"Content-Type": content_type}, b"[]")
    assert r.status_code == 415
    assert r.json["error"] == "unsupported_media_type"
    assert r.json["message"].startswith(expected)


def test_binary_mode_with_non_json_data(client):
    headers, _ = binary(JOB, {})
    headers["Content-Type"] = "text/plain"
    r = _post(client, headers, b"hello")
    assert r.status_code == 415
    assert "binary-mode event data must be JSON" in r.json["message"]


# -- transient problems: 503 with Retry-After, nothing recorded ------------------------------


def test_store_locked_is_503_and_nothing_is_recorded(make_app, env, dataset, tmp_path):
    app = make_app(env, KFP_TRAINER_DB_BUSY_TIMEOUT_S="0.2")
    client = app.test_client()
    assert client.get("/readyz").status_code == 200  # creates the database
    db = Path(env["KFP_TRAINER_STATE_DIR"]) / "handler.sqlite3"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        m = requested_message(request_data("job-locked", dataset))
        r = client.post("/", headers=m.headers, data=m.body)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "7"
        assert r.json == {
            "error": "store_unavailable",
            "message": "the job store is unavailable right now; retry later",
        }
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.get("/jobs/job-locked").status_code == 404
    r = client.post("/", headers=m.headers, data=m.body)  # the retry goes through
    assert r.status_code == 200


def test_backend_not_ready_is_503(make_app, env, dataset):
    backend = "tests.handler.backends_for_tests:NotReadyBackend"
    client = make_app(env, KFP_TRAINER_BACKEND=backend).test_client()
    m = requested_message(request_data("job-nr", dataset))
    r = client.post("/", headers=m.headers, data=m.body)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "7"
    assert r.json["message"] == "the not-ready backend is not ready; retry later"
    assert client.get("/jobs/job-nr").status_code == 404
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["problems"] == {"backend": "the not-ready backend is not ready"}


def test_unexpected_errors_keep_internals_out_of_the_reply(make_app, env, dataset):
    backend = "tests.handler.backends_for_tests:BrokenBackend"
    client = make_app(env, KFP_TRAINER_BACKEND=backend).test_client()
    m = requested_message(request_data("job-x", dataset))
    r = client.post("/", headers=m.headers, data=m.body)
    assert r.status_code == 500
    assert r.json["error"] == "internal_error"
    assert "secret" not in r.get_data(as_text=True)
    assert r.json["message"].startswith("internal error (ref ")


# -- cancel, run.finished, ping --------------------------------------------------------------


def test_cancel_unknown_job_is_400(client):
    m = cancel_message("nobody")
    r = client.post("/", headers=m.headers, data=m.body)
    assert r.status_code == 400
    assert r.json["message"] == "unknown job 'nobody': nothing to cancel"


def test_cancel_finished_job_is_400(client, service, dataset):
    m = requested_message(request_data("job-f", dataset))
    client.post("/", headers=m.headers, data=m.body)
    wait_for(lambda: service.job("job-f")["status"] == "completed", 10, "job-f to complete")
    c = cancel_message("job-f")
    r = client.post("/", headers=c.headers, data=c.body)
    assert r.status_code == 400
    assert r.json["message"] == "job 'job-f' already completed: nothing to cancel"


def test_run_finished_for_unknown_job_is_400(client):
    headers, body = binary(contract.RUN_FINISHED, {"job_uuid": "ghost", "state": "SUCCEEDED"})
    r = client.post("/", headers=headers, data=body)
    assert r.status_code == 400
    assert r.json["message"] == "unknown job 'ghost': no run to reconcile"


def test_ping_reconciles(client):
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "p1",
        "ce-source": "/apis/v1/namespaces/ns/pingsources/tick",
        "ce-type": contract.PING,
        "Content-Type": "application/json",
    }
    r = client.post("/", headers=headers, data=b"{}")
    assert r.status_code == 202
    assert r.json == {"reconciled": 0}


def test_unknown_job_status_is_404_json(client):
    r = client.get("/jobs/none-such")
    assert r.status_code == 404
    assert r.json == {"error": "not_found", "message": "no job with job_uuid 'none-such'"}


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/nope").json["error"] == "not_found"
    r = client.put("/")
    assert r.status_code == 405
    assert r.json["error"] == "method_not_allowed"
