"""A minimal Kubernetes API on loopback serving DataSciencePipelinesApplication objects.

Just enough for ``kubernetes.client.CustomObjectsApi.get_namespaced_custom_object`` over real
HTTP, with a bearer-token check, and a kubeconfig that points at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.support.loopback import LoopbackHTTPServer, QuietHandler

_PATH = re.compile(
    r"^/apis/datasciencepipelinesapplications\.opendatahub\.io/(?P<version>[^/]+)"
    r"/namespaces/(?P<ns>[^/]+)/datasciencepipelinesapplications/(?P<name>[^/?]+)$"
)


class KubeApi(LoopbackHTTPServer):
    """The API server: serving from construction until ``close()``."""

    def __init__(self, token: str, version: str = "v1") -> None:
        self.token = token
        self.version = version
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.seen_auth: list[str | None] = []
        api = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                api.seen_auth.append(self.headers.get("Authorization"))
                match = _PATH.match(self.path.split("?")[0])
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    self._send(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return
                key = (match["ns"], match["name"]) if match else None
                if not match or match["version"] != api.version or key not in api.objects:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                else:
                    self._send(200, api.objects[key])

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)
        self.start()

    def add_dspa(self, namespace: str, name: str, external_url: str | None) -> None:
        status = (
            {"components": {"apiServer": {"externalUrl": external_url}}} if external_url else {}
        )
        self.objects[(namespace, name)] = {
            "apiVersion": f"datasciencepipelinesapplications.opendatahub.io/{self.version}",
            "kind": "DataSciencePipelinesApplication",
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": token or self.token}}],
                    "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "ctx",
                }
            )
        )
        return path
