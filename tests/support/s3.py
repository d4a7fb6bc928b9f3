"""S3 on loopback: moto in server mode (real HTTP), and an endpoint that only answers errors.

FaultyS3 sends what a real S3 (or MinIO, Ceph) sends when it is overloaded or refuses: the HTTP
status, and for methods that have a body the ``<Error><Code>..</Code><Message>..</Message>
</Error>`` XML botocore reads the error code from (a HEAD answer has no body: botocore then uses
the status). Moto cannot be told to answer 503 SlowDown, so the transient cases use FaultyS3.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.loopback import LoopbackHTTPServer, QuietHandler

REGION = "us-east-1"


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server (server mode, real HTTP) on a free loopback port; yields its URL.

    Its werkzeug access lines are dropped: once a test in this process has imported
    llama-stack, whose rich handler on the root logger writes to the terminal pytest reports
    on, every S3 request printed one into pytest's progress line."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def set_credentials(
    monkeypatch: pytest.MonkeyPatch, access_key: str, secret_key: str, **more: str
) -> dict[str, str]:
    """Put S3 credentials (and ``more``) in this process's env; returns what was set."""
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
        **more,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class FaultyS3(LoopbackHTTPServer):
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

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.read_body()
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

        super().__init__(Handler)


def boto_client(endpoint: str, attempts: int = 2) -> Any:
    """A boto3 S3 client for ``endpoint`` with few retries (the tests stay fast)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=REGION,
        config=Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=5,
        ),
    )


class RefusingS3(LoopbackHTTPServer):
    """An S3 endpoint in front of ``upstream`` (moto) that refuses writes to keys containing
    ``refuse`` with ``403 AccessDenied`` and passes everything else through: a bucket policy
    that lets a task read its inputs but not write its results."""

    def __init__(self, upstream: str, refuse: str) -> None:
        import requests

        self.refused: list[str] = []
        outer = self
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied by the test's bucket policy</Message>"
            b"<RequestId>test</RequestId></Error>"
        )
        session = requests.Session()

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                data = self.read_body()
                writing = self.command in ("PUT", "POST", "DELETE")
                if writing and refuse in self.path:
                    outer.refused.append(f"{self.command} {self.path}")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = session.request(
                    self.command, upstream + self.path, headers=headers, data=data, timeout=60
                )
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                content = b"" if self.command == "HEAD" else answer.content
                length = answer.headers.get("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        super().__init__(Handler)
