"""The KFP API client the remote backend uses: bounded calls, fresh token and rebuild on 401.

It talks to the same generated REST client (``kfp_server_api``) that ``kfp.Client`` wraps, not to
``kfp.Client`` itself: that constructor retries healthz for up to 25 s when the server is down,
prints links to stdout, may write ``~/.config/kfp/context.json`` and sets no request timeouts, and
after a 401 its own refresh leaves it broken. Here every call has a timeout, "unreachable"
becomes :class:`BackendUnavailable` (the handler answers 503 and Knative retries), and a 401
rebuilds the whole client with a token read afresh from its source, then retries once.

The calls that answer runs (list, create, get) are on every request's path, so they skip the
generated client's generic serialization and speak plain JSON: the request body is built from
bytes (the compiled pipeline spec is encoded once per process, handler/remote/runs.py) and the
answer is read as JSON (records.py). They go over ``http.client`` connections kept alive per
thread, with the TLS settings of the generated client's pool (handler/remote/transport.py); through
a proxy, over the generated client's proxy manager. Measured against the KFP stand-in on
loopback, handler CPU: create_run 864 -> ~300 us, a list by name 256 -> ~130 us.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from handler import logs, metrics
from handler.backends.base import BackendUnavailable
from handler.remote.auth import Token, TokenError, read_token
from handler.remote.discovery import discover_host
from handler.remote.records import Run
from handler.remote.transport import Connections
from handler.settings import RemoteSettings

log = logs.get("handler.remote.kfp")
T = TypeVar("T")

DEFAULT_TIMEOUT_S: Final = 30.0
_RUNS_PATH: Final = "/apis/v2beta1/runs"
# Statuses the API server (or the route in front of it) answers while it is not really there.
_TRANSIENT: Final = frozenset((0, 408, 429, 500, 502, 503, 504))


class KfpError(RuntimeError):
    """KFP refused a call for good; the message names the call and KFP's reason."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KfpNotFound(KfpError):
    """The experiment or run does not exist (HTTP 404)."""


class KfpAuthError(BackendUnavailable):
    """KFP rejected a freshly read token (401/403): someone must fix the credentials.

    A ``BackendUnavailable``: the event is answered 503 and redelivered, so nothing is lost
    while the token source is being fixed.
    """


@dataclass(frozen=True)
class _Apis:
    host: str
    token: Token
    api_client: Any
    runs: Any
    experiments: Any
    healthz: Any
    # The plain-JSON calls: what they send on (http.client connections kept per thread, or,
    # when KFP is reached through a proxy or its certificate is checked against another name,
    # the generated client's proxy manager or pool), what goes before an API path on that pool
    # (the whole base URL or the host's path prefix), and the headers and timeout they send.
    connections: Connections | None
    pool: Any
    prefix: str
    headers: dict[str, str]
    timeout: Any


def _filter_equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


class KfpClient:
    """The KFP calls remote mode needs, built lazily (no I/O until the first call).

    Thread-safe: gunicorn threads and the service's dispatcher share one instance.
    """

    def __init__(self, remote: RemoteSettings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._remote = remote
        # (connect, read): the generated client ignores a plain float (it honours int or pair).
        self._timeout_s = (timeout_s, timeout_s)
        self._lock = threading.Lock()
        self._apis: _Apis | None = None
        self._multi_user: bool | None = None
        self._experiment_ids: dict[str, str] = {}

    # ---- construction -----------------------------------------------------------------------
    def _build(self) -> _Apis:
        import kfp_server_api
        import urllib3

        host = self._remote.kfp_host or discover_host(
            self._remote.kfp_namespace, self._remote.dspa_name
        )
        if not host.startswith(("http://", "https://")):
            host = "https://" + host
        try:
            token = read_token(self._remote)
        except TokenError as exc:
            raise KfpAuthError(str(exc)) from None
        config = kfp_server_api.Configuration(host=host.rstrip("/"))
        config.verify_ssl = self._remote.kfp_verify_ssl
        ca_bundle = self._remote.kfp_ca_bundle
        if ca_bundle:
            if not os.path.isfile(ca_bundle):
                raise BackendUnavailable(
                    f"KFP_CA_BUNDLE={ca_bundle!r} is not a readable file; mount the CA "
                    "certificate(s) of the KFP server there, or unset it"
                )
            config.ssl_ca_cert = ca_bundle
        if host.startswith("https://") and not self._remote.kfp_verify_ssl:
            log.warning("kfp TLS certificate is not verified (KFP_VERIFY_SSL=false)")
        # Retry connecting, never a request that may have reached the server (a POST that
        # created a run must not be sent twice).
        config.retries = urllib3.Retry(total=2, connect=2, read=0, status=0, redirect=0)
        if token.value:
            config.api_key["authorization"] = token.value
            config.api_key_prefix["authorization"] = "Bearer"
        api_client = kfp_server_api.ApiClient(config)
        headers = {"Accept": "application/json", "User-Agent": api_client.user_agent}
        if token.value:
            headers["Authorization"] = f"Bearer {token.value}"
        base, manager = config.host, api_client.rest_client.pool_manager
        connections = None
        if config.proxy:
            pool, prefix = manager, base
        else:  # one pool for the one host: no URL parsing on the way to it per call
            pool, prefix = manager.connection_from_url(base), urlsplit(base).path.rstrip("/")
            if config.assert_hostname is None:
                import certifi

                connections = Connections(
                    base,
                    timeout_s=self._timeout_s[1],
                    verify=bool(config.verify_ssl),
                    ca_file=config.ssl_ca_cert or certifi.where(),  # as the generated client
                    cert_file=config.cert_file,
                    key_file=config.key_file,
                )
        log.info("kfp client built", extra={"kfp_host": host, "token_source": token.source})
        return _Apis(
            host=host,
            token=token,
            api_client=api_client,
            runs=kfp_server_api.RunServiceApi(api_client),
            experiments=kfp_server_api.ExperimentServiceApi(api_client),
            healthz=kfp_server_api.HealthzServiceApi(api_client),
            connections=connections,
            pool=pool,
            prefix=prefix,
            headers=headers,
            timeout=urllib3.Timeout(connect=self._timeout_s[0], read=self._timeout_s[1]),
        )

    def _current(self, rebuild_from: _Apis | None = None) -> _Apis:
        with self._lock:
            if self._apis is None or self._apis is rebuild_from:
                old, self._apis = self._apis, None
                if old is not None:
                    _close(old)
                self._apis = self._build()
            return self._apis

    @property
    def host(self) -> str:
        """The API server's URL (discovering or building the client if needed)."""
        return self._current().host

    # ---- the one call path ------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[_Apis], T]) -> T:
        """Run ``fn`` against the API; on 401 rebuild with a fresh token and retry once.

        :raises BackendUnavailable: the server is unreachable, overloaded or times out.
        :raises KfpAuthError: KFP still rejects the freshly read token.
        :raises KfpNotFound: 404. :raises KfpError: any other refusal.
        """
        apis = self._current()
        operation = _operation(what)
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                answer = fn(apis)
                _measured(operation, started, None)
                return answer
            except Exception as exc:
                _measured(operation, started, exc)
                if not _is_remote_failure(exc):
                    raise  # a programming error, not something KFP said
                status = _status(exc)
                if status in (401, 403) and attempt == 1:
                    log.warning(
                        "kfp rejected the token; rebuilding the client with a fresh one",
                        extra={"call": what, "status": status, "token_source": apis.token.source},
                    )
                    apis = self._current(rebuild_from=apis)
                    continue
                raise self._translate(what, apis, exc, status) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, what: str, apis: _Apis, exc: Exception, status: int | None) -> Exception:
        if status is None and _untrusted_certificate(exc):
            return BackendUnavailable(
                f"KFP at {apis.host} presented a TLS certificate this handler does not trust "
                f"({what}): {_brief(exc)}; set KFP_CA_BUNDLE to the CA that signed it (or, "
                "for a test server only, KFP_VERIFY_SSL=false)"
            )
        if status is None:  # no HTTP answer at all: connection refused, DNS, timeout
            return BackendUnavailable(f"KFP at {apis.host} is unreachable ({what}): {_brief(exc)}")
        if status in (401, 403):
            return KfpAuthError(
                f"KFP at {apis.host} rejected the token from {apis.token.source} "
                f"(HTTP {status}) on {what}, also after re-reading it; fix the credentials "
                "(KFP_TOKEN, KF_PIPELINES_SA_TOKEN_PATH or the kubeconfig login)"
            )
        reason = _reason(exc)
        if status in _TRANSIENT:
            return BackendUnavailable(
                f"KFP at {apis.host} answered HTTP {status} ({what}): {reason}"
            )
        if status == 404:
            return KfpNotFound(f"KFP {what}: not found: {reason}", status)
        return KfpError(f"KFP refused {what} (HTTP {status}): {reason}", status)

    # ---- the calls --------------------------------------------------------------------------
    def healthz(self, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = (timeout_s, timeout_s) if timeout_s else self._timeout_s
        reply = self.call(
            "healthz", lambda a: a.healthz.healthz_service_get_healthz(_request_timeout=timeout)
        )
        return reply.to_dict()

    def _namespace(self) -> str | None:
        """The namespace to pass, only where the server is multi-user (single-user ignores it)."""
        if self._multi_user is None:
            self._multi_user = bool(self.healthz().get("multi_user"))
        return self._remote.kfp_namespace if self._multi_user else None

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (safe when replicas race)."""
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        namespace = self._namespace()
        found = self._find_experiment(name, namespace)
        if found is None:
            import kfp_server_api

            body = kfp_server_api.V2beta1Experiment(display_name=name, namespace=namespace)
            try:
                found = self.call(
                    f"create experiment {name!r}",
                    lambda a: a.experiments.experiment_service_create_experiment(
                        body, _request_timeout=self._timeout_s
                    ),
                ).experiment_id
                log.info("kfp experiment created", extra={"experiment": name})
            except KfpError as exc:
                if exc.status != 409:  # 409: another replica created it first
                    raise
                found = self._find_experiment(name, namespace)
                if found is None:
                    raise
        self._experiment_ids[name] = found
        return found

    def forget_experiments(self) -> None:
        """Drop cached experiment ids (one was deleted; the next call looks again)."""
        self._experiment_ids.clear()

    def _find_experiment(self, name: str, namespace: str | None) -> str | None:
        kwargs: dict[str, Any] = {"filter": _filter_equals("display_name", name)}
        if namespace:
            kwargs["namespace"] = namespace
        reply = self.call(
            f"list experiments named {name!r}",
            lambda a: a.experiments.experiment_service_list_experiments(
                page_size=10, _request_timeout=self._timeout_s, **kwargs
            ),
        )
        experiments = reply.experiments or []
        return experiments[0].experiment_id if experiments else None

    def _send(
        self,
        apis: _Apis,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        """One plain-JSON call (the module docstring says why and over what).

        A non-2xx answer raises the generated client's ``ApiException``, as its own calls do,
        so :meth:`call` treats both alike.
        """
        import kfp_server_api
        from kfp_server_api.rest import RESTResponse

        target = path + ("?" + urlencode(query, quote_via=quote) if query else "")
        headers = apis.headers
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        if apis.connections is not None:
            answer = apis.connections.send(method, target, body, headers)
            status, data = answer.status, answer.data
            if not 200 <= status <= 299:
                exc = kfp_server_api.ApiException(status=status, reason=answer.reason)
                exc.body, exc.headers = data.decode(errors="replace"), answer.headers
                raise exc
        else:
            response = apis.pool.urlopen(
                method, apis.prefix + target, body=body, headers=headers, timeout=apis.timeout
            )
            if not 200 <= response.status <= 299:
                raise kfp_server_api.ApiException(http_resp=RESTResponse(response))
            data = response.data
        value = json.loads(data or b"{}")
        return value if isinstance(value, dict) else {}

    def runs_named(self, experiment_id: str, display_name: str) -> list[Run]:
        """Every run called ``display_name`` in the experiment, oldest first."""
        query = {
            "experiment_id": experiment_id,
            "filter": _filter_equals("display_name", display_name),
            "page_size": 100,
        }
        reply = self.call(
            f"list runs named {display_name!r}", lambda a: self._send(a, "GET", _RUNS_PATH, query)
        )
        return _oldest_first([Run.parse(r) for r in reply.get("runs") or []])

    def runs_in_states(
        self,
        experiment_id: str,
        states: tuple[str, ...],
        *,
        page_size: int = 100,
        max_pages: int = 50,
        finished_after: datetime | None = None,
    ) -> list[Any]:
        """The experiment's runs whose state is one of ``states`` (and, if given, that finished
        at or after ``finished_after``), oldest first (paged).

        Bounded: at most ``max_pages`` pages; more is logged, not fetched.
        """
        predicates: list[dict[str, Any]] = [
            {"operation": "IN", "key": "state", "stringValues": {"values": list(states)}}
        ]
        if finished_after is not None:
            moment = finished_after.astimezone(UTC).isoformat().replace("+00:00", "Z")
            predicates.append(
                {"operation": "GREATER_THAN_EQUALS", "key": "finished_at", "timestampValue": moment}
            )
        query: dict[str, Any] = {
            "experiment_id": experiment_id,
            "filter": json.dumps({"predicates": predicates}),
            "page_size": page_size,
            "sort_by": "created_at",
        }
        runs: list[Run] = []
        token = ""
        for _ in range(max_pages):
            paged = {**query, "page_token": token} if token else query
            reply = self.call(
                f"list runs in states {','.join(states)}",
                lambda a, paged=paged: self._send(a, "GET", _RUNS_PATH, paged),
            )
            runs.extend(Run.parse(r) for r in reply.get("runs") or [])
            token = reply.get("next_page_token") or ""
            if not token:
                break
        else:
            log.warning(
                "more runs than one listing reads; the newest were not read",
                extra={"experiment_id": experiment_id, "read": len(runs)},
            )
        return _oldest_first(runs)

    def runs_page(self, experiment_id: str, token: str, size: int) -> tuple[list[Run], str]:
        """One page of the experiment's runs, newest first, and the next page's token."""
        query: dict[str, Any] = {
            "experiment_id": experiment_id,
            "page_size": size,
            "sort_by": "created_at desc",
        }
        if token:
            query["page_token"] = token
        reply = self.call("list runs", lambda a: self._send(a, "GET", _RUNS_PATH, query))
        runs = [Run.parse(r) for r in reply.get("runs") or []]
        return runs, reply.get("next_page_token") or ""

    def create_run(
        self,
        experiment_id: str,
        display_name: str,
        pipeline_spec_json: bytes,
        parameters: dict[str, Any],
    ) -> Run:
        """Create a run of the pipeline whose spec is ``pipeline_spec_json`` (see run_body)."""
        body = run_body(experiment_id, display_name, pipeline_spec_json, parameters)
        reply = self.call(
            f"create run {display_name!r}", lambda a: self._send(a, "POST", _RUNS_PATH, body=body)
        )
        return Run.parse(reply)

    def get_run(self, run_id: str) -> Run:
        path = f"{_RUNS_PATH}/{quote(run_id, safe='')}"
        return Run.parse(self.call(f"get run {run_id}", lambda a: self._send(a, "GET", path)))

    def terminate_run(self, run_id: str) -> None:
        self.call(
            f"terminate run {run_id}",
            lambda a: a.runs.run_service_terminate_run(run_id, _request_timeout=self._timeout_s),
        )

    def delete_run(self, run_id: str) -> None:
        self.call(
            f"delete run {run_id}",
            lambda a: a.runs.run_service_delete_run(run_id, _request_timeout=self._timeout_s),
        )

    def close(self) -> None:
        with self._lock:
            if self._apis is not None:
                _close(self._apis)
                self._apis = None


def run_body(
    experiment_id: str, display_name: str, pipeline_spec_json: bytes, parameters: dict[str, Any]
) -> bytes:
    """The create-run request body (V2beta1Run as the API reads it). ``pipeline_spec_json`` is
    the ``pipeline_spec`` field as JSON bytes, encoded once by the caller, not per run."""
    return b"".join(
        (
            b'{"experiment_id":',
            json.dumps(experiment_id).encode(),
            b',"display_name":',
            json.dumps(display_name).encode(),
            b',"pipeline_spec":',
            pipeline_spec_json,
            b',"runtime_config":{"parameters":',
            json.dumps(parameters, separators=(",", ":")).encode(),
            b"}}",
        )
    )


def _oldest_first(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: (str(r.created_at or ""), r.run_id))


def _operation(what: str) -> str:
    """A call's operation as a metric label: "get run abc" -> "get run"."""
    return " ".join(word for word in what.split()[:2] if word.isalpha()) or "other"


def _measured(operation: str, started: float, exc: BaseException | None) -> None:
    metrics.KFP_CALLS.labels(operation, metrics.outcome(exc)).inc()
    metrics.KFP_SECONDS.labels(operation).observe(time.perf_counter() - started)


def _is_remote_failure(exc: Exception) -> bool:
    import http.client

    import kfp_server_api
    import urllib3

    return isinstance(
        exc,
        (
            kfp_server_api.ApiException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
            TimeoutError,
        ),
    )


def _status(exc: Exception) -> int | None:
    """The HTTP status of a kfp_server_api error, or None when no HTTP answer came back."""
    import kfp_server_api

    if isinstance(exc, kfp_server_api.ApiException):
        return exc.status or None  # 0: TLS failure or a request that was never sent
    return None


def _reason(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if body:
        try:
            doc = json.loads(body)
            return str(doc.get("message") or doc.get("error") or body)[:500]
        except (ValueError, AttributeError):
            return str(body)[:500]
    return str(getattr(exc, "reason", "") or exc)[:500]


def _untrusted_certificate(exc: BaseException) -> bool:
    """Whether a certificate verification failure is somewhere in ``exc``'s causes."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        seen.add(id(item))
        todo += [getattr(item, "reason", None), item.__cause__, item.__context__, *item.args]
    return False


def _brief(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _close(apis: _Apis) -> None:
    try:
        if apis.connections is not None:
            apis.connections.close()
        apis.api_client.close()
    except Exception:  # closing a broken client must not hide the real problem
        log.debug("closing the kfp api client failed", exc_info=True)
