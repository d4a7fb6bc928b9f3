"""The handler as the Containerfile starts it, on 127.0.0.1, plus a sink standing in for K_SINK.

:class:`HandlerPod` runs the `handler` target's CMD (parsed from the Containerfile) in the
environment knative/ gives the container, with the few overrides a loopback test needs. The
listening socket is bound here (port 0) and handed to gunicorn as ``fd://``, so no port race.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from tests.knative import manifests as m


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


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


class EventSink:
    """Records the CloudEvents POSTed to it (what the Broker would get through K_SINK)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    sink.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def events(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class HandlerPod:
    """gunicorn + the handler app in the deployed environment, on a loopback socket."""

    def __init__(self, work: Path, overrides: dict[str, str]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "gunicorn.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("KFP_", "K_", "S3_"))},
            **m.deployed_env(),
            "KFP_TRAINER_STATE_DIR": str(work / "state"),
            "GUNICORN_BIND": f"fd://{self.listener.fileno()}",
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            handler_cmd(),
            cwd=work,  # not the checkout: the image has only the installed package
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(self.listener.fileno(),),
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            try:
                return requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, timeout, f"{self.url}/readyz")
        # gunicorn holds its own copy now; ours would keep queueing connections after it stops.
        self.listener.close()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def terminate(self) -> None:
        """SIGTERM to the arbiter, as the kubelet sends it."""
        os.kill(self.proc.pid, signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.listener.close()
        self._log.close()


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
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body
