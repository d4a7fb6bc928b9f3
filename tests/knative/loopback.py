"""The handler as the Containerfile starts it, on 127.0.0.1, and a raw HTTP/1.1 connection to it.

:class:`HandlerPod` runs the `handler` target's CMD (parsed from the Containerfile) in the
environment knative/ gives the container, with the few overrides a loopback test needs. The
listening socket is bound here (port 0) and handed to gunicorn as ``fd://``, so no port race.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from tests.knative import manifests as m
from tests.knative.callers import Callers
from tests.support.gunicorn import GunicornProcess
from tests.support.http_client import parse_response


def handler_cmd() -> list[str]:
    """The `handler` target's CMD, with `gunicorn` run from this interpreter's environment."""
    argv: list[str] | None = None
    stage = ""
    for line in (m.REPO / "Containerfile").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            stage = words[-1]
        elif words[:1] == ["CMD"] and stage == "handler":
            argv = json.loads(line.partition("CMD")[2])
    assert argv and argv[0] == "gunicorn", f"unexpected handler CMD {argv}"
    return [sys.executable, "-m", "gunicorn", *argv[1:]]


class HandlerPod(GunicornProcess):
    """gunicorn + the handler app in the deployed environment, on a loopback socket;
    ``callers`` (tests/knative/callers.py) holds the tokens the deployment's senders present."""

    def __init__(self, work: Path, overrides: dict[str, str], callers: Callers) -> None:
        super().__init__(work / "gunicorn.log", own_session=True)
        self.callers = callers
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("KFP_", "K_", "S3_"))},
            **m.deployed_env(),
            "KFP_TRAINER_STATE_DIR": str(work / "state"),
        }
        # cwd: not the checkout, the image has only the installed package
        self.launch(handler_cmd(), work, base, overrides)

    def wait_ready(self, timeout: float = 90.0) -> None:
        super().wait_ready(timeout)
        # gunicorn holds its own copy now; ours would keep queueing connections after it stops.
        self.sock.close()


def raw_request(port: int, head: str, body: bytes, *, timeout: float) -> socket.socket:
    """Open a connection and send the request head; the caller sends ``body`` (in parts)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sendall(head.encode("latin-1") + body)
    return conn


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a whole HTTP/1.1 response (the request said Connection: close)."""
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    conn.close()
    return parse_response(b"".join(chunks))
