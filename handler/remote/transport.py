"""Keep-alive HTTP(S) connections to one host, one per thread: the KFP calls on every request.

The handler makes three KFP calls per ``job.requested`` (list, create, list). Through urllib3's
``urlopen`` each cost about 100-180 us of CPU more than the same request over ``http.client``
(retry and timeout objects, target re-encoding, a second ``send`` for the body, the response
wrapper), measured against the KFP stand-in on loopback. This sends them over ``http.client``
with the TLS settings the generated client's pool uses (CA bundle, verification, client
certificate), so the trust and the errors are the same.

Like urllib3 it retries connecting (``connect_attempts``), never a request that may have reached
the server, and it drops a kept-alive connection the server has closed before reusing it.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

CONNECT_ATTEMPTS: Final = 3  # as urllib3's Retry(connect=2): the first try and two more


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]
    data: bytes


class Connections:
    """HTTP/1.1 connections to ``base_url``'s host, one kept alive per calling thread."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        verify: bool = True,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.context: ssl.SSLContext | None = None
        if self.https:
            self.context = ssl.create_default_context(cafile=ca_file)
            if not verify:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
            if cert_file:
                self.context.load_cert_chain(cert_file, key_file)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def _new(self) -> http.client.HTTPConnection:
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout_s, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                conn.connect()
                break
            except ssl.SSLError:
                conn.close()
                raise  # a certificate problem does not go away by retrying
            except OSError:
                conn.close()
                if attempt == CONNECT_ATTEMPTS:
                    raise
        with self._lock:
            self._all.append(conn)
        return conn

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.sock is None or _dropped(conn)):
            self._discard(conn)
            conn = None
        if conn is None:
            conn = self._local.conn = self._new()
        return conn

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        """One request and its whole answer. A failure closes the connection (the next call
        opens a new one).

        :raises OSError: connecting, sending or reading failed (also a timeout).
        :raises http.client.HTTPException: the answer was not HTTP.
        """
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            self._discard(conn)
            raise
        if response.will_close:
            self._discard(conn)
        return Answer(response.status, response.reason, dict(response.getheaders()), data)

    def _discard(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server (readable while idle:
    EOF, or bytes nobody asked for)."""
    poller = select.poll()
    try:
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


__all__ = ["CONNECT_ATTEMPTS", "Answer", "Connections"]
