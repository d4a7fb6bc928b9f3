"""The HTTP face of the stand-in: the KFP v2beta1 REST routes the SDK calls, with bearer auth.

Responses are snake_case JSON as the real API server's grpc-gateway writes them, and errors use
its ``{"error", "code", "message", "details"}`` body. The server can be stopped and started again
on the same port while runs keep executing, which is how tests make "KFP unreachable".
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.kfp_standin.filters import FilterError
from tests.kfp_standin.runs import ApiError, KfpState
from tests.kfp_standin.simulated import Simulation
from tests.support.loopback import RestartableServer, TrackedHandler

log = logging.getLogger("kfp_standin")

_API = "/apis/v2beta1"
Route = tuple[str, re.Pattern[str], str]
_ROUTES: list[Route] = [
    ("GET", re.compile(rf"^{_API}/healthz$"), "healthz"),
    ("GET", re.compile(rf"^{_API}/experiments$"), "list_experiments"),
    ("POST", re.compile(rf"^{_API}/experiments$"), "create_experiment"),
    ("GET", re.compile(rf"^{_API}/experiments/(?P<id>[^/:]+)$"), "get_experiment"),
    ("GET", re.compile(rf"^{_API}/runs$"), "list_runs"),
    ("POST", re.compile(rf"^{_API}/runs$"), "create_run"),
    ("GET", re.compile(rf"^{_API}/runs/(?P<id>[^/:]+)$"), "get_run"),
    ("DELETE", re.compile(rf"^{_API}/runs/(?P<id>[^/:]+)$"), "delete_run"),
    ("POST", re.compile(rf"^{_API}/runs/(?P<id>[^/:]+):terminate$"), "terminate_run"),
]


class KfpStandin:
    """A KFP API server on 127.0.0.1 that really runs what it is given (with kfp.local).

    >>> standin = KfpStandin(token="t1").start()   # doctest: +SKIP
    >>> kfp.Client(host=standin.url, existing_token="t1").list_runs()   # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        token: str | None = "standin-token",
        work_dir: Path | None = None,
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        simulate: Simulation | None = None,
    ) -> None:
        """:param tls: (certificate, key) PEM files: serve HTTPS with them instead of HTTP.
        :param simulate: run pipelines cheaply in-process (tests/kfp_standin/simulated.py)."""
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="kfp-standin-")
        self.state = KfpState(Path(work_dir or self._tmp.name))  # type: ignore[union-attr]
        self.state.simulation = simulate
        self._token = token
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status): for assertions
        self._http = RestartableServer(_handler_class(self), port=port, tls=tls, name="kfp-standin")

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> KfpStandin:
        """Start serving (again): the same port after a :meth:`stop`, a free one at first."""
        self._http.start()
        return self

    def stop(self) -> None:
        """Stop answering (connections are refused and kept-alive ones cut); runs keep
        executing, like pods would."""
        self._http.stop()

    def close(self) -> None:
        """Stop serving and kill every execution."""
        self.stop()
        self.state.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> KfpStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    # ---- what the test controls -------------------------------------------------------------
    def set_token(self, token: str | None) -> None:
        """Rotate the one valid bearer token (``None``: no auth required)."""
        self._token = token

    def set_secret(self, name: str, data: dict[str, str]) -> None:
        """Create or replace a Kubernetes Secret that ``secretAsEnv`` can draw from."""
        self.state.secrets[name] = dict(data)

    def set_task_env(self, env: dict[str, str]) -> None:
        """Non-secret env every task sees (what the task image or a ConfigMap would set)."""
        self.state.task_env = dict(env)

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        return header == f"Bearer {self._token}"

    # ---- the API ----------------------------------------------------------------------------
    def dispatch(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                return getattr(self, "_" + name)(query, body, **match.groupdict())
        if any(p.match(path) for _, p, _ in _ROUTES):
            raise ApiError(405, f"Method {method} not allowed on {path}")
        raise ApiError(404, f"Not Found: {path}")

    def _healthz(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return {"multi_user": self.state.multi_user, "pipeline_store": "database"}

    def _list_experiments(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return self.state.list_experiments(query)

    def _create_experiment(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return self.state.create_experiment(_object(body))

    def _get_experiment(self, query: dict[str, str], body: Any, id: str) -> dict[str, Any]:
        return self.state.get_experiment(id)

    def _list_runs(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return self.state.list_runs(query)

    def _create_run(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        return self.state.create_run(_object(body), query.get("experiment_id"))

    def _get_run(self, query: dict[str, str], body: Any, id: str) -> dict[str, Any]:
        return self.state.get_run(id)

    def _terminate_run(self, query: dict[str, str], body: Any, id: str) -> dict[str, Any]:
        self.state.terminate_run(id)
        return {}

    def _delete_run(self, query: dict[str, str], body: Any, id: str) -> dict[str, Any]:
        self.state.delete_run(id)
        return {}


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid input error: request body must be a JSON object")
    return body


def _handler_class(standin: KfpStandin) -> type[TrackedHandler]:
    class Handler(TrackedHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, payload = 200, {}
            try:
                if not standin.authorized(self.headers.get("Authorization")):
                    raise ApiError(401, "Unauthenticated: a valid bearer token is required")
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    raise ApiError(400, "Invalid input error: body is not JSON") from None
                query = dict(parse_qsl(parts.query))
                payload = standin.dispatch(method, parts.path, query, body)
            except ApiError as exc:
                status, payload = exc.status, exc.body()
            except FilterError as exc:
                status, payload = 400, ApiError(400, f"Invalid input error: {exc}").body()
            except Exception:
                log.exception("kfp stand-in failed on %s %s", method, parts.path)
                status, payload = 500, ApiError(500, "Internal error").body()
            standin.requests.append((method, parts.path, status))
            data = json.dumps(payload).encode()
            with contextlib.suppress(OSError):  # the client (or a stop()) closed the connection
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("kfp stand-in: " + format, *args)

    return Handler
