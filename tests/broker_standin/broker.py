"""A Knative Broker on 127.0.0.1 that behaves as the real one does over the wire.

Ingress: ``POST /`` takes one CloudEvent (binary or structured mode) and answers ``202``. Each
event goes to every Trigger whose filter matches (knative/triggers.yaml), as a binary-mode POST
with ``Prefer: reply``, ``ce-knativearrivaltime`` and a ``traceparent``. The subscriber's answer:

- ``200`` carrying a CloudEvent: a reply; it enters the Broker as a new event. Any other 2xx:
  delivered, nothing more.
- no answer, ``5xx``, ``404``, ``408``, ``409`` or ``429``: retried after the Trigger's backoff
  (``Delivery.delay_s``, times ``time_scale``), up to ``retry`` times, then dead-lettered.
- any other answer: dead-lettered at once.

Dead letters carry Knative's extensions ``knativeerrordest``, ``knativeerrorcode`` and
``knativeerrordata`` (base64). Delivery is at least once: a seeded random ``duplicate_rate``
of deliveries (20% by default) is sent twice, the copy starting at about the same moment, with
retries of its own. A subscriber with several URLs (replicas behind a Service) gets them
round-robin, one URL per attempt.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from handler import contract
from tests.broker_standin.triggers import RETRIED_STATUSES, Trigger, load

log = logging.getLogger("broker_standin")

ATTEMPT_TIMEOUT_S = (2.0, 60.0)  # connect, read: a handler answers within its own bounds


@dataclass
class Record:
    """One delivery attempt, for assertions."""

    trigger: str
    event_id: str
    event_type: str
    url: str
    status: int | None  # None: no answer (refused, reset, timed out)
    copy: int  # 0 the delivery, 1 its duplicate
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Delivery:
    trigger: Trigger
    headers: dict[str, str]
    body: bytes
    copy: int
    retries_done: int = 0


class BrokerStandin:
    """``with BrokerStandin(subscribers) as broker: broker.url`` (see the module docstring).

    :param subscribers: Service name -> URL, a list of URLs (round-robin), or a callable
        returning the current list (replicas that come and go).
    :param time_scale: multiplies every backoff delay (1/60: a minute of the manifests' backoff
        takes a second here).
    """

    def __init__(
        self,
        subscribers: dict[str, str | list[str] | Callable[[], list[str]]],
        *,
        triggers: list[Trigger] | None = None,
        time_scale: float = 1.0,
        duplicate_rate: float = 0.2,
        seed: int = 11,
        workers: int = 48,
    ) -> None:
        self.triggers = triggers if triggers is not None else load()
        self.subscribers = subscribers
        self.time_scale = time_scale
        self.duplicate_rate = duplicate_rate
        self._random = random.Random(seed)
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._timers: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._pending = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="broker")
        self._session = threading.local()
        # What happened, for the tests.
        self.ingested: list[dict[str, Any]] = []  # every event that entered, as structured dicts
        self.attempts: list[Record] = []
        self.dead_letters: list[dict[str, Any]] = []  # event dicts + the error extensions
        self.faults: list[str] = []  # deliveries the stand-in itself failed on (a bug here)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ingress(self))
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="broker-ingress", daemon=True),
            threading.Thread(target=self._timer_loop, name="broker-timers", daemon=True),
        ]

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> BrokerStandin:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._threads[0].is_alive():  # shutdown() waits forever on a loop that never ran
            self.server.shutdown()
        self.server.server_close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    # ---- ingress ----------------------------------------------------------------------------
    def ingest(self, headers: dict[str, str], body: bytes) -> None:
        """Take one event (as the ingress does) and fan it out to the matching Triggers.

        :raises contract.ContractError: not a CloudEvent.
        """
        event = contract.from_http(headers, body)
        as_dict = contract.event_to_dict(event)
        binary = contract.to_http(event)
        attributes = {k: v for k, v in as_dict.items() if k not in ("data", "data_base64")}
        with self._lock:
            self.ingested.append(as_dict)
        for trigger in self.triggers:
            if not trigger.matches(attributes):
                continue
            copies = 2 if self._random.random() < self.duplicate_rate else 1
            for copy in range(copies):
                self._submit(_Delivery(trigger, dict(binary.headers), binary.body, copy))

    # ---- delivery ---------------------------------------------------------------------------
    def _submit(self, delivery: _Delivery, delay_s: float = 0.0) -> None:
        with self._cond:
            self._pending += 1
            if delay_s <= 0:
                self._pool.submit(self._attempt, delivery)
            else:
                heapq.heappush(
                    self._timers, (time.monotonic() + delay_s, next(self._seq), delivery)
                )
                self._cond.notify_all()

    def _timer_loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, delivery = heapq.heappop(self._timers)
                    self._pool.submit(self._attempt, delivery)
                wait = self._timers[0][0] - now if self._timers else None
                self._cond.wait(wait)

    def _urls(self, name: str) -> list[str]:
        target = self.subscribers.get(name)
        if target is None:
            return []
        if callable(target):
            return list(target())
        return [target] if isinstance(target, str) else list(target)

    def _next_url(self, name: str) -> str | None:
        urls = self._urls(name)
        if not urls:
            return None
        with self._lock:
            counter = self._round_robin.setdefault(name, itertools.count())
            return urls[next(counter) % len(urls)]

    def _http(self) -> requests.Session:
        session = getattr(self._session, "value", None)
        if session is None:
            session = self._session.value = requests.Session()
        return session

    def _attempt(self, delivery: _Delivery) -> None:
        try:
            self._attempt_once(delivery)
        except Exception as exc:
            log.exception("broker stand-in delivery failed")
            with self._lock:
                self.faults.append(f"{delivery.headers.get('ce-id', '')}: {exc!r}")
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _attempt_once(self, delivery: _Delivery) -> None:
        trigger = delivery.trigger
        url = self._next_url(trigger.subscriber)
        headers = {
            **delivery.headers,
            "Prefer": "reply",
            "ce-knativearrivaltime": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        }
        status: int | None = None
        answer: requests.Response | None = None
        if url is not None:
            try:
                answer = self._http().post(
                    url, headers=headers, data=delivery.body, timeout=ATTEMPT_TIMEOUT_S
                )
                status = answer.status_code
            except requests.RequestException:
                status = None
        with self._lock:
            self.attempts.append(
                Record(
                    trigger.name,
                    headers.get("ce-id", ""),
                    headers.get("ce-type", ""),
                    url or "",
                    status,
                    delivery.copy,
                )
            )
        if status is not None and 200 <= status < 300:
            if status == 200 and answer is not None:
                self._route_reply(answer)
            return
        retried = status is None or status >= 500 or status in RETRIED_STATUSES
        if retried and delivery.retries_done < trigger.delivery.retry:
            delivery.retries_done += 1
            delay = trigger.delivery.delay_s(delivery.retries_done) * self.time_scale
            self._submit(delivery, delay)
            return
        self._dead_letter(delivery, url, status, answer.content if answer is not None else b"")

    def _route_reply(self, answer: requests.Response) -> None:
        headers = {k.lower(): v for k, v in answer.headers.items()}
        structured = headers.get("content-type", "").startswith("application/cloudevents+json")
        if "ce-type" not in headers and not structured:
            return  # a 200 without an event: nothing to route
        try:
            self.ingest(headers, answer.content)
        except contract.ContractError:
            log.warning("a reply that is not a CloudEvent was dropped")

    def _dead_letter(
        self, delivery: _Delivery, url: str | None, status: int | None, body: bytes
    ) -> None:
        event = contract.event_to_dict(contract.from_http(delivery.headers, delivery.body))
        event.update(
            knativeerrordest=url or "",
            knativeerrorcode=str(status or ""),
            knativeerrordata=base64.b64encode(body[:1024]).decode(),
        )
        with self._lock:
            self.dead_letters.append({**event, "trigger": delivery.trigger.name})
        target = self._next_url(delivery.trigger.delivery.dead_letter or "")
        if target is None:
            return
        try:
            message = contract.to_http(contract.event_from_dict(event))
            self._http().post(target, headers=message.headers, data=message.body, timeout=10)
        except requests.RequestException:
            log.warning("the dead-letter sink did not answer")

    # ---- what the tests ask -----------------------------------------------------------------
    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no delivery is in flight or waiting for a retry."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.ingested if e["type"] == event_type]

    def dead_lettered(self, event_type: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.dead_letters if event_type in (None, e["type"])]


def _ingress(broker: BrokerStandin) -> type[BaseHTTPRequestHandler]:
    class Ingress(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                broker.ingest(headers, body)
                status, reply = 202, b""
            except contract.ContractError as exc:
                status, reply = 400, json.dumps({"error": str(exc)}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            return None

    return Ingress
