"""A scripted HTTP server on 127.0.0.1 for the provider's remote-path tests.

It answers each request with the next scripted reply (the last one repeats) and records what it
received, so a test can check retries, headers and bodies as they crossed the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.loopback import LoopbackHTTPServer, QuietHandler


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class LoopbackServer(LoopbackHTTPServer):
    """``with LoopbackServer([...]) as srv: srv.url`` -- replies in order, records requests.

    Give ``responder`` instead to compute each reply from the request (e.g. a status route).
    """

    def __init__(
        self,
        replies: list[Scripted] | None = None,
        responder: Callable[[Received], Scripted] | None = None,
    ) -> None:
        self.replies = list(replies or [])
        self.responder = responder
        self.received: list[Received] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def _serve(self) -> None:
                body = self.read_body()
                request = Received(self.command, self.path, dict(self.headers.items()), body)
                with outer._lock:
                    outer.received.append(request)
                    if outer.responder is not None:
                        reply = outer.responder(request)
                    elif len(outer.replies) == 1:
                        reply = outer.replies[0]
                    else:
                        reply = outer.replies.pop(0)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _serve

        super().__init__(Handler)
