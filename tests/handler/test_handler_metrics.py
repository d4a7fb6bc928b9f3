"""GET /metrics: Prometheus text that prometheus_client parses, summed over gunicorn's workers."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from handler import contract
from tests.handler.helpers import request_data
from tests.support.gunicorn import Gunicorn
from tests.support.http_client import ce_headers
from tests.support.loopback import closed_port_url, free_port
from tests.support.prometheus import samples

JOB = contract.JOB_REQUESTED


def received(values: dict, event_type: str, status: int) -> float:
    key = ("kfp_trainer_events_received_total", (("status", str(status)), ("type", event_type)))
    return values.get(key, 0.0)


def binary_post(url: str, data: object, *, event_id: str, ctype: str = "application/json"):
    headers = {**ce_headers(JOB, event_id), "Content-Type": ctype}
    return requests.post(url + "/", headers=headers, data=json.dumps(data), timeout=30)


def half_sent_post(
    url: str, data: object, *, event_id: str
) -> tuple[http.client.HTTPConnection, bytes]:
    """Send a POST's headers only: the sync worker that accepts it waits for the body.

    While it waits, every other request goes to the other worker, so both answer by
    construction rather than by how the kernel hands out connections.
    """
    body = json.dumps(data).encode()
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    conn.putrequest("POST", "/")
    for name, value in {**ce_headers(JOB, event_id), "Content-Length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    return conn, body


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path, model_store: Path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    metrics_port = free_port()
    g = Gunicorn(
        {
            **env,
            "KFP_TRAINER_BACKEND": "hold",  # accepts jobs, starts nothing
            # Model names resolve in an S3 store nobody answers for: a request without
            # model_artifact is a 503; the others name their model artifact.
            "KFP_TRAINER_MODEL_STORE": "s3://models/store",
            # The artifact the others name lies outside that store: allowed explicitly.
            "KFP_TRAINER_DATA_ROOTS": f"{env['KFP_TRAINER_DATA_ROOTS']},{model_store}",
            "S3_ENDPOINT_URL": closed_port_url(),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "KFP_TRAINER_METRICS_PORT": str(metrics_port),
        },
        tmp_path / "gunicorn.log",
        workers=2,
    )
    try:
        g.wait_ready()
        yield g, f"http://127.0.0.1:{metrics_port}"
    finally:
        assert g.stop() == 0


def test_counters_equal_a_scripted_mix_across_two_workers(served, dataset, model_store):
    g, master = served
    artifact = {"model_artifact": {"uri": str(model_store / "llama3.2-tiny")}}
    sent = {200: 0, 400: 0, 415: 0, 503: 0}
    accepted = [request_data(f"m-{i}", dataset, **artifact) for i in range(6)]
    held, held_body = half_sent_post(g.url, accepted[0], event_id=accepted[0]["job_uuid"])
    for data in accepted[1:]:  # the held worker is busy: these all go to the other one
        assert binary_post(g.url, data, event_id=data["job_uuid"]).status_code == 200
        sent[200] += 1
    held.send(held_body)
    assert held.getresponse().status == 200
    held.close()
    sent[200] += 1
    for data in accepted[:3]:  # redelivered: answered as the first time, counted as sent
        assert binary_post(g.url, data, event_id=data["job_uuid"]).status_code == 200
        sent[200] += 1
    for i in range(4):
        bad = {**accepted[0], "job_uuid": f"bad-{i}", "training_config": {"n_epochs": 0}}
        assert binary_post(g.url, bad, event_id=f"bad-{i}").status_code == 400
        sent[400] += 1
    for i in range(2):
        reply = binary_post(g.url, accepted[0], event_id=f"x-{i}", ctype="text/plain")
        assert reply.status_code == 415
        sent[415] += 1
    for i in range(2):
        reply = binary_post(g.url, request_data(f"nostore-{i}", dataset), event_id=f"n-{i}")
        assert reply.status_code == 503, reply.text
        sent[503] += 1
    # whichever worker answers, /metrics is the sum over both; the master's port says the same
    for values in (samples(g.url), samples(g.url), samples(master)):
        for status, count in sent.items():
            assert received(values, "job.requested", status) == count, (status, values)
        emitted = values[("kfp_trainer_events_emitted_total", (("type", "job.scheduled"),))]
        assert emitted == len(accepted)  # redeliveries emit nothing new
        requests_timed = values[
            ("kfp_trainer_request_duration_seconds_count", (("method", "POST"), ("route", "/")))
        ]
        assert requests_timed == sum(sent.values())
    access = [r for r in g.log_lines() if r.get("logger") == "gunicorn.access"]
    workers = {r["pid"] for r in access if r["method"] == "POST"}
    assert len(workers) == 2, f"only {workers} answered"
