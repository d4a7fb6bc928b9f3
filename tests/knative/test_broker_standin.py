"""The Broker stand-in (tests/broker_standin/) routes, retries and dead-letters as knative/ says.

Its subscribers here are small loopback servers that answer what each case needs, so every
rule the remote handler relies on is shown on its own: Trigger filters on ``type``, 200 replies
routed back in, retries with the manifests' backoff, dead letters, duplicates, round-robin.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from handler import contract
from tests.broker_standin import BrokerStandin, load
from tests.knative import manifests as m
from tests.support.http_client import ce_headers
from tests.support.loopback import LoopbackHTTPServer, QuietHandler, closed_port_url
from tests.support.sink import Sink

SCALE = 1 / 1000  # a second of the manifests' backoff takes a millisecond here
HANDLER = m.HANDLER


class Subscriber(LoopbackHTTPServer):
    """Answers each POST with ``answer(headers, body) -> (status, headers, body)``; records."""

    def __init__(self, answer: Callable[[dict[str, str], bytes], tuple[int, dict, bytes]]) -> None:
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.read_body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer._lock:
                    outer.received.append((headers, body, time.monotonic()))
                status, extra, reply = answer(headers, body)
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        super().__init__(Handler)


def always(status: int) -> Callable[[dict[str, str], bytes], tuple[int, dict, bytes]]:
    return lambda headers, body: (status, {}, json.dumps({"status": status}).encode())


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    with Sink() as display, Sink() as dead:
        yield display, dead


def broker_for(handler: str | list[str], display: Sink, dead: Sink, **kw: Any) -> BrokerStandin:
    subscribers = {
        HANDLER: handler,
        "kfp-trainer-event-display": display.url,
        "kfp-trainer-dead-letters": dead.url,
    }
    return BrokerStandin(subscribers, time_scale=SCALE, duplicate_rate=0.0, **kw)


def send(broker: BrokerStandin, event_type: str, job_uuid: str, data: dict | None = None) -> None:
    import requests

    headers = ce_headers(event_type, f"{job_uuid}/{event_type[-12:]}", subject=job_uuid)
    body = json.dumps(data if data is not None else {"job_uuid": job_uuid})
    assert requests.post(broker.url, headers=headers, data=body, timeout=10).status_code == 202


def test_triggers_come_from_the_manifests():
    triggers = {t.name: t for t in load()}
    to_handler = sorted(t.exact[0]["type"] for t in triggers.values() if t.subscriber == HANDLER)
    assert to_handler == sorted(contract.BROKER_CONSUMED_TYPES)
    (completions,) = [t for t in triggers.values() if t.subscriber != HANDLER]
    assert sorted(b["type"] for b in completions.exact) == sorted(contract.TERMINAL_TYPES)
    for trigger in triggers.values():
        assert trigger.delivery.dead_letter == "kfp-trainer-dead-letters"


def test_the_handler_triggers_ride_out_the_sized_kfp_outage():
    """docs/deploy.md sizes the handler Triggers' delivery for a 10-minute KFP outage: the last
    retry goes out 1023 s after the first attempt, and one retry fewer would not reach 600 s."""
    for trigger in load():
        if trigger.subscriber != HANDLER:
            continue
        delivery = trigger.delivery
        assert delivery.exponential and delivery.backoff_delay_s == 1.0, trigger.name
        assert delivery.window_s() == 1023.0, trigger.name
        last = delivery.delay_s(delivery.retry)
        assert delivery.window_s() - last < 600.0, "ten is the fewest retries that ride it out"


def test_events_reach_only_the_triggers_whose_type_matches(sinks):
    display, dead = sinks
    with Subscriber(always(202)) as handler, broker_for(handler.url, display, dead) as broker:
        send(broker, contract.JOB_REQUESTED, "r-1")
        send(broker, contract.JOB_COMPLETED, "r-1", {"job_uuid": "r-1", "status": "completed"})
        send(broker, contract.JOB_PROGRESS, "r-1", {"job_uuid": "r-1", "status": "in_progress"})
        assert broker.wait_idle(10)
    assert [h["ce-type"] for h, _, _ in handler.received] == [contract.JOB_REQUESTED]
    assert display.types("r-1") == ["job.completed"]
    assert dead.events == []
    headers = handler.received[0][0]
    assert headers["prefer"] == "reply" and headers["traceparent"].startswith("00-")
    assert "ce-knativearrivaltime" in headers


def test_a_200_reply_event_is_routed_back_in_and_a_202_one_is_not(sinks):
    display, dead = sinks

    def reply(status: int) -> Callable[[dict[str, str], bytes], tuple[int, dict, bytes]]:
        def answer(headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
            job = headers["ce-subject"]
            event = contract.make_event(
                contract.JOB_COMPLETED, "/h", {"job_uuid": job, "status": "completed"}
            )
            message = contract.to_http(event)
            return status, dict(message.headers), message.body

        return answer

    for status, routed in ((200, ["job.completed"]), (202, [])):
        job = f"reply-{status}"
        with Subscriber(reply(status)) as handler, broker_for(handler.url, display, dead) as b:
            send(b, contract.RUN_FINISHED, job, {"job_uuid": job, "state": "SUCCEEDED"})
            assert b.wait_idle(10)
        assert display.types(job) == routed, status


@pytest.mark.parametrize("status", [503, 500, 404, 408, 409, 429])
def test_retried_statuses_are_retried_with_backoff_then_dead_lettered(sinks, status):
    display, dead = sinks
    job = f"retry-{status}"
    with Subscriber(always(status)) as handler, broker_for(handler.url, display, dead) as broker:
        send(broker, contract.JOB_REQUESTED, job)
        assert broker.wait_idle(30)
    (trigger,) = [t for t in broker.triggers if t.exact[0]["type"] == contract.JOB_REQUESTED]
    times = [at for _, _, at in handler.received]
    assert len(times) == 1 + trigger.delivery.retry  # the attempt and every retry
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    expected = [trigger.delivery.delay_s(n) * SCALE for n in range(1, len(times))]
    for gap, want in zip(gaps, expected, strict=True):
        assert gap >= want * 0.9, (gaps, expected)
    assert gaps[-1] > gaps[-4] * 4, "exponential: each wait doubles (512 ms after 64 ms here)"
    (letter,) = dead.of(job)
    assert letter["type"] == contract.JOB_REQUESTED
    assert letter["knativeerrorcode"] == str(status)
    assert letter["knativeerrordest"] == handler.url
    assert broker.dead_lettered(contract.JOB_REQUESTED)[0]["subject"] == job


def test_no_answer_is_retried_too(sinks):
    display, dead = sinks
    with broker_for(closed_port_url(), display, dead) as broker:
        send(broker, contract.JOB_CANCEL_REQUESTED, "refused-1")
        assert broker.wait_idle(30)
    attempts = [a for a in broker.attempts if a.event_type == contract.JOB_CANCEL_REQUESTED]
    assert len(attempts) == 11 and {a.status for a in attempts} == {None}
    assert dead.of("refused-1")[0]["knativeerrorcode"] == ""


@pytest.mark.parametrize("status", [400, 401, 403, 413, 415])
def test_other_failures_go_to_the_dead_letter_sink_at_once(sinks, status):
    display, dead = sinks
    job = f"final-{status}"
    with Subscriber(always(status)) as handler, broker_for(handler.url, display, dead) as broker:
        send(broker, contract.JOB_REQUESTED, job)
        assert broker.wait_idle(10)
    assert len(handler.received) == 1
    (letter,) = dead.of(job)
    assert letter["knativeerrorcode"] == str(status)


def test_a_fifth_of_deliveries_go_out_twice_and_replicas_are_served_round_robin(sinks):
    display, dead = sinks
    with Subscriber(always(202)) as a, Subscriber(always(202)) as b:
        subscribers = {
            HANDLER: [a.url, b.url],
            "kfp-trainer-event-display": display.url,
            "kfp-trainer-dead-letters": dead.url,
        }
        with BrokerStandin(subscribers, time_scale=SCALE, seed=5) as broker:
            for i in range(200):
                send(broker, contract.JOB_REQUESTED, f"dup-{i}")
            assert broker.wait_idle(30)
        ids = [h["ce-id"] for h, _, _ in a.received + b.received]
    twice = len(ids) - len(set(ids))
    assert len(set(ids)) == 200
    assert 20 <= twice <= 60, twice  # 20% of 200, give or take
    assert abs(len(a.received) - len(b.received)) <= 1


def test_an_ingress_post_that_is_not_a_cloudevent_is_a_400(sinks):
    import requests

    display, dead = sinks
    with broker_for(closed_port_url(), display, dead) as broker:
        reply = requests.post(broker.url, data=b"{}", timeout=10)
    assert reply.status_code == 400
    assert broker.ingested == []
