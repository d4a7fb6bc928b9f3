"""A sink that records the CloudEvents POSTed to it: what K_SINK or a broker would receive."""

from __future__ import annotations

import threading
from typing import Any

from handler import contract
from tests.support.loopback import LoopbackHTTPServer, QuietHandler


class Sink(LoopbackHTTPServer):
    """``with Sink() as sink: sink.url`` -- answers 202 and keeps every event it got.

    ``fail`` makes it answer 503 (to test retries); ``attempts`` counts every POST. ``raw``
    holds (lower-cased headers, body) as they crossed the wire, ``events`` the parsed events.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []
        self.fail = False
        self.attempts = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.read_body()
                with sink._lock:
                    sink.attempts += 1
                    failing = sink.fail
                if failing:
                    self._answer(503)
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = contract.from_http(headers, body)
                with sink._lock:
                    sink.raw.append((headers, body))
                    sink.events.append(contract.event_to_dict(event))
                self._answer(202)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)

    @property
    def url(self) -> str:
        return self.base_url + "/"

    def received(self) -> list[tuple[dict[str, str], bytes]]:
        """A snapshot of ``raw``."""
        with self._lock:
            return list(self.raw)

    def of(self, job_uuid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("subject") == job_uuid]

    def types(self, job_uuid: str) -> list[str]:
        return [e["type"].removeprefix(contract.PREFIX) for e in self.of(job_uuid)]
