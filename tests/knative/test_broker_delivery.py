"""The handler as a Knative Broker calls it: real gunicorn, the Containerfile's CMD, knative/'s env.

A Trigger delivers each event over HTTP in binary mode, adding ce-knativearrivaltime, a W3C
traceparent and `Prefer: reply`; it routes a 200 reply carrying a CloudEvent back into the
Broker, drops 202 replies, retries 404/408/409/429/5xx and dead-letters other 4xx. The
SinkBinding gives the pod K_SINK and K_CE_OVERRIDES. KFP is the stand-in with simulated runs
(tests/kfp_standin/simulated.py) and S3 is moto; nothing else differs from the deployment.
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
from tests.kfp_standin import KfpStandin, Simulation
from tests.knative import manifests as m
from tests.knative.callers import Callers
from tests.knative.loopback import HandlerPod, raw_request, read_response
from tests.support.http_client import ce_headers
from tests.support.jobs import job_request, write_dataset
from tests.support.loopback import wait_for
from tests.support.s3 import moto_server
from tests.support.sink import Sink

EXTENSION = "kfpdeployment"  # what a SinkBinding's ceOverrides would add
RETRIED_BY_KNATIVE = {404, 408, 409, 429}
TIMEOUT = 30.0


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "delivery-key", "AWS_SECRET_ACCESS_KEY": "delivery-secret"}


class Cluster:
    """What the pod talks to: S3 (moto), KFP (the stand-in, simulated runs), the Broker (a sink)."""

    def __init__(self, moto_url: str, tmp: Any) -> None:
        import boto3

        self.moto_url = moto_url
        self.bucket = m.config_map_data()["S3_BUCKET"]
        self.prefix = m.config_map_data()["S3_PREFIX"]
        self.s3 = boto3.client(
            "s3", endpoint_url=moto_url, region_name="us-east-1", **_boto(CREDENTIALS)
        )
        self.s3.create_bucket(Bucket=self.bucket)
        self.s3.put_object(
            Bucket=self.bucket, Key=f"{self.prefix}/models/llama3.2-tiny.tar", Body=b"m"
        )
        self.dataset = write_dataset(tmp / "train.jsonl")
        self.standin = KfpStandin(token=None, work_dir=tmp / "kfp", simulate=Simulation(0.2))
        self.standin.set_secret(m.config_map_data()["KFP_TRAINER_S3_SECRET"], CREDENTIALS)
        self.standin.set_task_env({"S3_ENDPOINT_URL": moto_url})
        self.standin.start()
        # Identity checks are on as deployed: the senders' tokens and the API that vouches.
        self.callers = Callers(tmp)

    def overrides(self, sink: Sink) -> dict[str, str]:
        """What differs from knative/'s environment on loopback, and nothing more."""
        return {
            "KFP_HOST": self.standin.url,
            "K_SINK": sink.url,
            "K_CE_OVERRIDES": json.dumps({"extensions": {EXTENSION: "loopback"}}),
            "S3_ENDPOINT_URL": self.moto_url,
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1",
            "KFP_TRAINER_NOTIFY_WINDOW_S": "5",
            **self.callers.overrides(),
        }

    def dataset_uri(self, job_uuid: str) -> str:
        key = f"{self.prefix}/datasets/{job_uuid}/train.jsonl"
        self.s3.upload_file(str(self.dataset), self.bucket, key)
        return f"s3://{self.bucket}/{key}"

    def runs_named(self, job_uuid: str) -> list[dict[str, Any]]:
        flt = json.dumps(
            {
                "predicates": [
                    {"operation": "EQUALS", "key": "display_name", "stringValue": job_uuid}
                ]
            }
        )
        return self.standin.state.list_runs({"filter": flt}).get("runs", [])


def _boto(credentials: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with moto_server() as url:
        cluster = Cluster(url, tmp_path_factory.mktemp("cluster"))
        try:
            yield cluster
        finally:
            cluster.standin.close()
            cluster.callers.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as sink:
        yield sink


@pytest.fixture(scope="module")
def pod(
    tmp_path_factory: pytest.TempPathFactory, cluster: Cluster, sink: Sink
) -> Iterator[HandlerPod]:
    pod = HandlerPod(tmp_path_factory.mktemp("pod"), cluster.overrides(sink), cluster.callers)
    try:
        pod.wait_ready()
        yield pod
    finally:
        pod.stop()


def request_data(job_uuid: str, dataset_uri: str = "", **changes: Any) -> dict[str, Any]:
    """A job.requested payload as the provider sends it in remote mode (everything in S3);
    without ``dataset_uri`` the dataset is one nobody uploaded (the run will fail on it)."""
    bucket = m.config_map_data()["S3_BUCKET"]
    base = f"s3://{bucket}/{m.config_map_data()['S3_PREFIX']}"
    return job_request(
        job_uuid,
        dataset_uri or f"{base}/datasets/{job_uuid}/train.jsonl",
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
    """POST as the Broker's Trigger for ``event_type`` delivers it, with that Trigger's token."""
    event_id = kw.pop("event_id", f"{uuid.uuid4()}")
    headers = broker_headers(event_type, event_id, **kw.pop("headers", {}))
    headers.update(pod.callers.for_event(event_type))
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


def test_broker_redelivery_gets_the_same_reply_and_no_second_run(pod, cluster):
    job_uuid = new_uuid()
    data = request_data(job_uuid, cluster.dataset_uri(job_uuid))
    first = deliver(pod, contract.JOB_REQUESTED, data, event_id="delivery-1")
    again = deliver(pod, contract.JOB_REQUESTED, data, event_id="delivery-1")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["ce-id"] == first.headers["ce-id"]
    assert again.content == first.content
    assert len(cluster.runs_named(job_uuid)) == 1


def test_structured_mode_is_accepted_too(pod):
    job_uuid = new_uuid()
    event = contract.make_event(contract.JOB_REQUESTED, "/tests", request_data(job_uuid))
    message = contract.to_http(event, structured=True)
    headers = {
        **message.headers,
        "Prefer": "reply",
        "traceparent": broker_headers("x", "y")["traceparent"],
        **pod.callers.for_event(contract.JOB_REQUESTED),
    }
    response = requests.post(f"{pod.url}/", data=message.body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["ce-type"] == contract.JOB_SCHEDULED


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


def _triggers_matching(headers: dict[str, str]) -> list[str]:
    return [t.name for t in m.find("Trigger") if _matches(t.body["spec"], headers)]


def test_a_runs_events_reach_k_sink_and_its_notice_is_answered_with_the_terminal_event(
    pod, cluster, sink
):
    """The run posts job.started, job.progress and run.finished to K_SINK (the Broker); the
    notice's Trigger delivers it to the handler, whose 200 reply is job.completed, which only
    the completion Trigger takes. Nothing the handler emits loops back into it."""
    job_uuid = new_uuid()
    data = request_data(job_uuid, cluster.dataset_uri(job_uuid))
    assert deliver(pod, contract.JOB_REQUESTED, data).status_code == 200

    def of_job() -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b in sink.received() if h.get("ce-subject") == job_uuid]

    def notice() -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b in of_job() if h["ce-type"] == contract.RUN_FINISHED]

    (headers, body), *_ = wait_for(notice, 60, f"the run.finished notice of {job_uuid}")
    assert _triggers_matching(headers) == ["kfp-trainer-run-finished"]
    for seen, _ in of_job():
        if seen["ce-type"] != contract.RUN_FINISHED:
            assert seen["ce-type"] in (contract.JOB_STARTED, contract.JOB_PROGRESS)
            assert seen["ce-source"] == m.config_map_data()["KFP_TRAINER_SOURCE"]
            assert _triggers_matching(seen) == [], f"{seen['ce-type']} would loop"
    # The Broker delivers the notice (as it came) to the handler; the answer is routed.
    as_delivered = {**headers, "Prefer": "reply", **pod.callers.for_event(contract.RUN_FINISHED)}
    reply = requests.post(f"{pod.url}/", data=body, headers=as_delivered, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    event = contract.from_http(dict(reply.headers), reply.content)
    assert event.get_type() == contract.JOB_COMPLETED
    assert event.get_id() == contract.event_id(job_uuid, contract.JOB_COMPLETED)
    assert reply.headers[f"ce-{EXTENSION}"] == "loopback"
    reply_headers = {k.lower(): v for k, v in reply.headers.items()}
    assert _triggers_matching(reply_headers) == ["kfp-trainer-completions"]
    done = contract.event_data(event)
    assert done["checkpoints"][0]["path"].startswith(f"s3://{cluster.bucket}/")
    status = requests.get(
        f"{pod.url}/jobs/{job_uuid}", headers=pod.callers.reader(), timeout=TIMEOUT
    )
    assert status.status_code == 200 and status.json()["status"] == "completed"


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
    assert set(response.json()) == {"reconciled", "emitted"}


def test_kfp_down_is_a_retryable_503_and_the_pod_stays_ready(pod, cluster):
    cluster.standin.stop()
    try:
        response = deliver(pod, contract.JOB_REQUESTED, request_data(new_uuid()))
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert "ce-type" not in response.headers
        assert requests.get(f"{pod.url}/readyz", timeout=TIMEOUT).status_code == 200
    finally:
        cluster.standin.start()


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
    event_type = headers.get("ce-type", contract.JOB_REQUESTED)
    headers = {**headers, **pod.callers.for_event(event_type)}  # a listed caller
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


def test_a_model_missing_from_the_model_store_is_refused_for_good(pod):
    """No model_artifact: the handler looks the model up in S3, where no such model is."""
    job_uuid = new_uuid()
    data = request_data(job_uuid)
    del data["model_artifact"]
    data["model"] = "Llama3.2-3B-Instruct"
    response = deliver(pod, contract.JOB_REQUESTED, data)
    assert response.status_code == 400, response.text
    assert "Llama3.2-3B-Instruct" in response.json()["message"]
    status = requests.get(
        f"{pod.url}/jobs/{job_uuid}", headers=pod.callers.reader(), timeout=TIMEOUT
    )
    assert status.status_code == 404


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tmp_path, cluster, sink):
    """Knative stops a pod with SIGTERM: gunicorn must stop taking work, finish what it has."""
    pod = HandlerPod(tmp_path, cluster.overrides(sink), cluster.callers)
    try:
        pod.wait_ready()
        job_uuid = new_uuid()
        body = json.dumps(request_data(job_uuid)).encode()
        headers = broker_headers(contract.JOB_REQUESTED, "in-flight", **{"ce-subject": job_uuid})
        headers.update(cluster.callers.for_event(contract.JOB_REQUESTED))
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
    finally:
        pod.stop()


def _graceful_timeout() -> int:
    return int(m.config_map_data()["GUNICORN_GRACEFUL_TIMEOUT"])


def test_callers_the_deployment_does_not_list_are_refused_for_good(pod):
    """No token: 401; the requests' Trigger sending a run.finished: 403. Both are final for
    Knative (dead-lettered), and neither says anything about the job."""
    job_uuid = new_uuid()
    body = json.dumps({"job_uuid": job_uuid, "state": "SUCCEEDED"}).encode()
    headers = broker_headers(contract.RUN_FINISHED, "wrong-1", **{"ce-subject": job_uuid})
    anonymous = requests.post(f"{pod.url}/", data=body, headers=headers, timeout=TIMEOUT)
    headers.update(pod.callers.for_event(contract.JOB_REQUESTED))
    wrong = requests.post(f"{pod.url}/", data=body, headers=headers, timeout=TIMEOUT)
    assert (anonymous.status_code, wrong.status_code) == (401, 403)
    for response in (anonymous, wrong):
        assert response.status_code not in RETRIED_BY_KNATIVE
        assert "ce-type" not in response.headers
        assert job_uuid not in response.text
    assert wrong.json()["message"].endswith("may not send run.finished notices")
    assert requests.get(f"{pod.url}/jobs", timeout=TIMEOUT).status_code == 401
