"""Remote mode on loopback, every part real: moto S3, the KFP stand-in, gunicorn, the Broker.

The handler runs as ``gunicorn -c handler/gunicorn_conf.py 'handler:create_app()'`` with
KFP_TRAINER_MODE=remote and K_SINK pointing at the Broker stand-in, which is where runs post
their notices and progress; the listening socket is bound first (port 0) and handed to gunicorn
as ``fd://``, so the Broker knows the handler's URL before it starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from handler import contract
from tests.support import REPO
from tests.support.gunicorn import APP_ARGV, GunicornProcess
from tests.support.http_client import ce_headers, curl, header_args


class RemoteHandler(GunicornProcess):
    """gunicorn serving the handler in remote mode on 127.0.0.1; ``start()`` runs it."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2, port: int = 0) -> None:
        super().__init__(log, ready_path="/healthz", own_session=True, port=port)
        self.base = {**os.environ, "GUNICORN_WORKERS": str(workers), "GUNICORN_THREADS": "4"}
        self.env = env

    def start(self, timeout: float = 90.0) -> RemoteHandler:
        self.launch(APP_ARGV, REPO, self.base, self.env)
        self.wait_ready(timeout)
        return self

    # ---- what Knative would send ------------------------------------------------------------
    def post_event(
        self, event_type: str, data: dict[str, Any], event_id: str, tmp: Path
    ) -> tuple[int, dict[str, str], bytes]:
        """POST a binary-mode CloudEvent with real curl."""
        body = tmp / f"body-{event_id.replace('/', '_')}.json"
        body.write_text(json.dumps(data))
        subject = data.get("job_uuid")
        headers = ce_headers(event_type, event_id, source="/tests/remote", subject=subject)
        args = header_args(headers)
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
