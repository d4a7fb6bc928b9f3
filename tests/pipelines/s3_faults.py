"""An S3 endpoint on 127.0.0.1 that answers every request with one error, as S3 words it.

What a real S3 (or MinIO, Ceph) sends when it is overloaded or refuses: the HTTP status, and
for methods that have a body the ``<Error><Code>..</Code><Message>..</Message></Error>`` XML
botocore reads the error code from (a HEAD answer has no body: botocore then uses the status).
Moto cannot be told to answer 503 SlowDown, so the transient cases use this.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultyS3:
    """``with FaultyS3(503, "SlowDown") as s3: s3.url`` -- every request gets that answer."""

    def __init__(self, status: int, code: str, message: str = "refused by the test") -> None:
        self.status = status
        self.code = code
        self.requests = 0
        outer = self
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>test</RequestId></Error>"
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests += 1
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("x-amz-request-id", "test")
                if outer.status in (429, 503):
                    self.send_header("Retry-After", "1")
                self.send_header(
                    "Content-Length", "0" if self.command == "HEAD" else str(len(body))
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def closed_port_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (connection refused)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def client(endpoint: str, attempts: int = 2) -> Any:
    """A boto3 S3 client for ``endpoint`` with few retries (the tests stay fast)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=5,
        ),
    )
