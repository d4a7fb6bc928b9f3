"""Remote mode on loopback, every part real: moto S3, the KFP stand-in, gunicorn, a test sink.

The handler runs as ``gunicorn -c handler/gunicorn_conf.py 'handler:create_app()'`` with
KFP_TRAINER_MODE=remote; its exit-handler notice URL is its own address, so the listening socket
is bound here first (port 0) and handed to gunicorn as ``fd://``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from handler import contract
from tests.handler.helpers import curl, wait_for

REPO = Path(__file__).resolve().parents[2]


class RemoteHandler:
    """gunicorn serving the handler in remote mode on 127.0.0.1."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.env = {
            **os.environ,
            "GUNICORN_WORKERS": str(workers),
            "GUNICORN_THREADS": "4",
            "GUNICORN_BIND": f"fd://{self.sock.fileno()}",
            "PYTHONUNBUFFERED": "1",
            "KFP_TRAINER_NOTIFY_URL": self.url + "/",
            **env,
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> RemoteHandler:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    str(REPO / "handler" / "gunicorn_conf.py"),
                    "handler:create_app()",
                ],
                cwd=REPO,
                env=self.env,
                pass_fds=(self.sock.fileno(),),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.log_text()[-4000:]}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout, "gunicorn /healthz")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.sock.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ---- what Knative would send ------------------------------------------------------------
    def post_event(
        self, event_type: str, data: dict[str, Any], event_id: str, tmp: Path
    ) -> tuple[int, dict[str, str], bytes]:
        """POST a binary-mode CloudEvent with real curl."""
        body = tmp / f"body-{event_id.replace('/', '_')}.json"
        body.write_text(json.dumps(data))
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/tests/remote",
            "ce-type": event_type,
            "Content-Type": "application/json",
        }
        if "job_uuid" in data:
            headers["ce-subject"] = data["job_uuid"]
        args = [arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")]
        return curl("-X", "POST", *args, "--data-binary", f"@{body}", self.url + "/")

    def request(self, data: dict[str, Any], tmp: Path) -> tuple[int, dict[str, str], bytes]:
        return self.post_event(contract.JOB_REQUESTED, data, f"req-{data['job_uuid']}", tmp)

    def cancel(self, job_uuid: str, tmp: Path) -> tuple[int, dict[str, str], bytes]:
        return self.post_event(
            contract.JOB_CANCEL_REQUESTED, {"job_uuid": job_uuid}, f"cancel-{job_uuid}", tmp
        )

    def ping(self, tmp: Path, n: int = 0) -> tuple[int, dict[str, str], bytes]:
        """A PingSource tick (``dev.knative.sources.ping``)."""
        return self.post_event(contract.PING, {}, f"ping-{n}", tmp)

    def job(self, job_uuid: str) -> tuple[int, dict[str, Any]]:
        status, _, body = curl(self.url + f"/jobs/{job_uuid}")
        return status, json.loads(body)
