"""Waiting and serving on 127.0.0.1: a bounded poll, a free port, threaded HTTP servers.

Every test server binds port 0, so two tests (or two helpers) never race for a port. The
stand-ins of real services build on :class:`RestartableServer`, which can have an outage.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps test output clean and reads bodies by Content-Length."""

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, *args: Any) -> None:
        return None


class LoopbackHTTPServer:
    """A threaded HTTP server on 127.0.0.1:<free port>; ``with`` (or ``start``/``close``) runs it.

    Subclasses give the request handler class; ``url`` has no trailing slash.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return self.base_url

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() waits forever on a loop that never ran
            self.server.shutdown()
            self._thread.join(10)
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrackedHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, its connection known to the :class:`RestartableServer` (so an
    outage can cut it) and sent without Nagle's delay, as Go's net/http servers do (without
    it, headers and body go out as two segments and a kept-alive client waits out a delayed
    ACK, ~40 ms, per call). A handshake that fails or a cut connection ends quietly."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.restartable.track(self.connection)  # type: ignore[attr-defined]

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()

    def finish(self) -> None:
        self.server.restartable.untrack(self.connection)  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            super().finish()


class RestartableServer:
    """A threaded HTTP(S) server on 127.0.0.1 that ``stop()`` takes down and ``start()`` brings
    back on the same port: how stand-ins make their service unreachable for a while.

    ``stop()`` refuses new connections and cuts kept-alive ones, so a client's pooled
    connection cannot outlive the outage. With ``tls`` (certificate, key) it serves HTTPS, the
    handshake done in each connection's thread rather than in the accept loop. ``handler`` is
    a :class:`TrackedHandler` subclass.
    """

    def __init__(
        self,
        handler: type[TrackedHandler],
        *,
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        name: str = "loopback",
    ) -> None:
        self._handler = handler
        self._port = port
        self._tls = tls
        self._name = name
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", self._port), self._handler)
        server.daemon_threads = True
        server.restartable = self  # type: ignore[attr-defined]
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=f"{self._name}-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self._port}"
