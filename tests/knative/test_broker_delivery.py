"""The handler as a Knative Broker calls it: real gunicorn, the Containerfile's CMD, knative/'s env.

A Trigger delivers each event over HTTP in binary mode, adding ce-knativearrivaltime, a W3C
traceparent and `Prefer: reply`; it routes a 200 reply carrying a CloudEvent back into the
Broker, drops 202 replies, retries 404/408/409/429/5xx and dead-letters other 4xx. The
SinkBinding gives the pod K_SINK and K_CE_OVERRIDES. Training is replaced by configuration
(KFP_TRAINER_BACKEND=noop: every job completes at once), nothing else is.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from handler import contract
from tests.knative import manifests as m
from tests.knative.loopback import HandlerPod, raw_request, read_response
from tests.support.http_client import ce_headers
from tests.support.jobs import job_request
from tests.support.loopback import free_port, wait_for
from tests.support.sink import Sink

EXTENSION = "kfpdeployment"  # what a SinkBinding's ceOverrides would add
RETRIED_BY_KNATIVE = {404, 408, 409, 429}
TIMEOUT = 30.0


def overrides(sink: Sink) -> dict[str, str]:
    """What differs from knative/'s environment on loopback, and nothing more."""
    return {
        "KFP_TRAINER_BACKEND": "noop",  # no KFP server here; runs complete at once
        "K_SINK": sink.url,
        "K_CE_OVERRIDES": json.dumps({"extensions": {EXTENSION: "loopback"}}),
        # The model store's S3 endpoint: nothing listens there (the transient-failure case).
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_MAX_ATTEMPTS": "1",
    }


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as sink:
        yield sink


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[HandlerPod]:
    pod = HandlerPod(tmp_path_factory.mktemp("pod"), overrides(sink))
    try:
        pod.wait_ready()
        yield pod
    finally:
        pod.stop()


def request_data(job_uuid: str, **changes: Any) -> dict[str, Any]:
    """A job.requested payload as the provider sends it in remote mode (everything in S3)."""
    bucket = m.config_map_data()["S3_BUCKET"]
    base = f"s3://{bucket}/{m.config_map_data()['S3_PREFIX']}"
    return job_request(
        job_uuid,
        f"{base}/datasets/{job_uuid}/train.jsonl",
        **{"model_artifact": {"uri": f"{base}/models/llama3.2-tiny.tar"}, **changes},
    )


def broker_headers(event_type: str, event_id: str, **extra: str) -> dict[str, str]:
    """Binary-mode headers as Knative's broker filter delivers an event to a subscriber."""
    return {
        **ce_headers(event_type, event_id, source="/llama-stack/post-training/kfp-torchtune"),
        "ce-time": "2026-11-28T22:00:00Z",
        "ce-knativearrivaltime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        "Prefer": "reply",
        "User-Agent": "Go-http-client/1.1",
        **extra,
    }


def deliver(pod: HandlerPod, event_type: str, data: Any, **kw: Any) -> requests.Response:
    event_id = kw.pop("event_id", f"{uuid.uuid4()}")
    headers = broker_headers(event_type, event_id, **kw.pop("headers", {}))
    if isinstance(data, dict) and "job_uuid" in data and event_type != contract.PING:
        headers["ce-subject"] = data["job_uuid"]
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return requests.post(f"{pod.url}/", data=body, headers=headers, timeout=TIMEOUT)


def new_uuid() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------ accepted


def test_accepted_request_answers_200_with_a_reply_event_the_broker_routes(pod):
    job_uuid = new_uuid()
    response = deliver(pod, contract.JOB_REQUESTED, request_data(job_uuid))
    assert response.status_code == 200, response.text
    reply = contract.from_http(dict(response.headers), response.content)
    assert reply.get_type() == contract.JOB_SCHEDULED
    assert reply.get_subject() == job_uuid
    assert reply.get_id() == contract.event_id(job_uuid, contract.JOB_SCHEDULED)
    assert reply.get_source() == m.config_map_data()["KFP_TRAINER_SOURCE"]
    assert response.headers[f"ce-{EXTENSION}"] == "loopback", "K_CE_OVERRIDES not applied"
    data = contract.validate_data(contract.JOB_SCHEDULED, contract.event_data(reply))
    assert data["status"] == "scheduled"


def test_broker_redelivery_gets_the_same_reply_and_no_second_job(pod):
    job_uuid = new_uuid()
    data = request_data(job_uuid)
    first = deliver(pod, contract.JOB_REQUESTED, data, event_id="delivery-1")
    again = deliver(pod, contract.JOB_REQUESTED, data, event_id="delivery-1")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["ce-id"] == first.headers["ce-id"]
    assert again.content == first.content
    jobs = requests.get(f"{pod.url}/jobs", timeout=TIMEOUT).json()["jobs"]
    assert [j["job_uuid"] for j in jobs].count(job_uuid) == 1


def test_structured_mode_is_accepted_too(pod):
    job_uuid = new_uuid()
    event = contract.make_event(contract.JOB_REQUESTED, "/tests", request_data(job_uuid))
    message = contract.to_http(event, structured=True)
    headers = {
        **message.headers,
        "Prefer": "reply",
        "traceparent": broker_headers("x", "y")["traceparent"],
    }
    response = requests.post(f"{pod.url}/", data=message.body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["ce-type"] == contract.JOB_SCHEDULED


def test_emitted_events_reach_k_sink_and_only_the_completion_trigger_matches_them(pod, sink):
    job_uuid = new_uuid()
    assert deliver(pod, contract.JOB_REQUESTED, request_data(job_uuid)).status_code == 200

    def of_job() -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b in sink.received() if h.get("ce-subject") == job_uuid]

    def terminal() -> bool:
        return any(h["ce-type"] in contract.TERMINAL_TYPES for h, _ in of_job())

    wait_for(terminal, 60, f"a terminal event for {job_uuid} at K_SINK")
    triggers = {t.name: t.body["spec"] for t in m.find("Trigger")}
    for headers, body in of_job():
        event = contract.from_http(headers, body)
        assert event.get_type() in contract.EMITTED_TYPES
        assert headers[f"ce-{EXTENSION}"] == "loopback"
        assert event.get_source() == m.config_map_data()["KFP_TRAINER_SOURCE"]
        matching = [name for name, spec in triggers.items() if _matches(spec, headers)]
        if event.get_type() in contract.TERMINAL_TYPES:
            assert matching == ["kfp-trainer-completions"], (event.get_type(), matching)
        else:
            assert matching == [], f"{event.get_type()} would loop into {matching}"
    status = requests.get(f"{pod.url}/jobs/{job_uuid}", timeout=TIMEOUT)
    assert status.status_code == 200 and status.json()["status"] == "completed"


def _matches(spec: dict[str, Any], headers: dict[str, str]) -> bool:
    """Whether a Trigger's filter lets an event through (the exact/any subset we use)."""

    def exact(attributes: dict[str, str]) -> bool:
        return all(headers.get(f"ce-{k}") == v for k, v in attributes.items())

    if "filters" in spec:
        expressions = spec["filters"]
        return all(
            any(exact(b["exact"]) for b in e["any"]) if "any" in e else exact(e["exact"])
            for e in expressions
        )
    return exact(spec.get("filter", {}).get("attributes", {}))


def test_reconcile_tick_as_pingsource_sends_it_is_taken(pod):
    (ping,) = m.find("PingSource")
    spec = ping.body["spec"]
    source = f"/apis/v1/namespaces/{m.namespace()}/pingsources/{ping.name}"
    response = deliver(
        pod,
        contract.PING,
        spec["data"].encode(),
        headers={"ce-source": source, "Content-Type": spec["contentType"]},
    )
    assert response.status_code == 202, response.text
    assert "ce-type" not in response.headers, "a ping must not produce a routed reply"


def test_run_finished_notice_is_taken_at_the_notify_url_path(pod):
    job_uuid = new_uuid()
    assert deliver(pod, contract.JOB_REQUESTED, request_data(job_uuid)).status_code == 200
    path = requests.utils.urlparse(m.config_map_data()["KFP_TRAINER_NOTIFY_URL"]).path or "/"
    event_id = f"{job_uuid}/run.finished"
    headers = ce_headers(contract.RUN_FINISHED, event_id, source="kfp-pipeline", subject=job_uuid)
    body = json.dumps({"job_uuid": job_uuid, "state": "SUCCEEDED", "error": None})
    response = requests.post(f"{pod.url}{path}", data=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 202, response.text


# ------------------------------------------------------------------------------ refused


def _bad_requests() -> list[tuple[str, dict[str, str], bytes, int, str]]:
    """(case, headers, body, expected status, words the message must contain)."""
    valid = request_data("job-bad")
    binary = broker_headers(contract.JOB_REQUESTED, "bad-1", **{"ce-subject": "job-bad"})
    no_training = {k: v for k, v in valid.items() if k != "training_config"}
    qat = {**valid, "algorithm_config": {"type": "QAT", "quantizer_name": "x", "group_size": 8}}
    too_big = {**valid, "logger_config": {"padding": "x" * (2 * 1024 * 1024)}}
    plain = {"Content-Type": "application/json", "Prefer": "reply"}
    return [
        ("not a CloudEvent", plain, json.dumps(valid).encode(), 400, "CloudEvent"),
        ("invalid JSON", binary, b"{not json", 400, "JSON"),
        ("schema violation", binary, json.dumps(no_training).encode(), 400, "training_config"),
        ("QAT", binary, json.dumps(qat).encode(), 400, "QAT"),
        (
            "a completion type sent to the handler",
            {**binary, "ce-type": contract.JOB_COMPLETED},
            json.dumps(valid).encode(),
            400,
            "unknown event type",
        ),
        (
            "cancel of an unknown job",
            {**binary, "ce-type": contract.JOB_CANCEL_REQUESTED, "ce-subject": "job-nope"},
            json.dumps({"job_uuid": "job-nope"}).encode(),
            400,
            "job-nope",
        ),
        ("over the body limit", binary, json.dumps(too_big).encode(), 413, "limit"),
        (
            "batch mode",
            {"Content-Type": "application/cloudevents-batch+json"},
            b"[]",
            415,
            "batch",
        ),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_permanent_problems_get_a_4xx_knative_does_not_retry(pod, case):
    _, headers, body, status, words = case
    response = requests.post(f"{pod.url}/", data=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    assert 400 <= response.status_code < 500
    assert response.status_code not in RETRIED_BY_KNATIVE
    assert "ce-type" not in response.headers, "an error must not be a routable reply"
    problem = response.json()
    assert words.lower() in problem["message"].lower(), problem


def test_same_job_uuid_with_other_content_is_refused_for_good(pod):
    job_uuid = new_uuid()
    assert deliver(pod, contract.JOB_REQUESTED, request_data(job_uuid)).status_code == 200
    changed = request_data(job_uuid, logger_config={"changed": True})
    response = deliver(pod, contract.JOB_REQUESTED, changed)
    assert response.status_code == 400, response.text
    assert "different content" in response.json()["message"]


def test_unreachable_model_store_is_a_retryable_503(pod):
    """No model_artifact: the handler looks the model up in S3, which does not answer."""
    job_uuid = new_uuid()
    data = request_data(job_uuid)
    del data["model_artifact"]
    response = deliver(pod, contract.JOB_REQUESTED, data)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "ce-type" not in response.headers
    assert requests.get(f"{pod.url}/jobs/{job_uuid}", timeout=TIMEOUT).status_code == 404


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tmp_path, sink):
    """Knative stops a pod with SIGTERM: gunicorn must stop taking work, finish what it has."""
    pod = HandlerPod(tmp_path, overrides(sink))
    try:
        pod.wait_ready()
        job_uuid = new_uuid()
        body = json.dumps(request_data(job_uuid)).encode()
        headers = broker_headers(contract.JOB_REQUESTED, "in-flight", **{"ce-subject": job_uuid})
        head = "POST / HTTP/1.1\r\nHost: handler\r\nConnection: close\r\n"
        head += f"Content-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        half = len(body) // 2
        conn = raw_request(pod.port, head, body[:half], timeout=TIMEOUT)
        time.sleep(1.5)  # a worker thread is now reading the body

        pod.terminate()

        def refusing() -> bool:
            try:
                socket.create_connection(("127.0.0.1", pod.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_for(refusing, 10, "gunicorn to stop accepting connections")
        assert pod.proc.poll() is None, "gunicorn exited with a request in flight"
        conn.sendall(body[half:])
        status, response_headers, _ = read_response(conn)
        assert status == 200
        assert response_headers["ce-type"] == contract.JOB_SCHEDULED
        assert response_headers["ce-subject"] == job_uuid
        code = pod.proc.wait(timeout=_graceful_timeout() + 10)
        assert code == 0, pod.log_tail()
        assert "handler service stopped" in pod.log_tail()
    finally:
        pod.stop()


def _graceful_timeout() -> int:
    return int(m.config_map_data()["GUNICORN_GRACEFUL_TIMEOUT"])
