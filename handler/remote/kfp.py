"""The KFP API client the remote backend uses: bounded calls, fresh token and rebuild on 401.

It talks to the same generated REST client (``kfp_server_api``) that ``kfp.Client`` wraps, not to
``kfp.Client`` itself: that constructor retries healthz for up to 25 s when the server is down,
prints links to stdout, may write ``~/.config/kfp/context.json`` and sets no request timeouts, and
after a 401 its own refresh leaves it broken. Here every call has a timeout, "unreachable"
becomes :class:`BackendUnavailable` (the handler answers 503 and Knative retries), and a 401
rebuilds the whole client with a token read afresh from its source, then retries once.
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

from handler import logs, metrics
from handler.backends.base import BackendUnavailable
from handler.remote.auth import Token, TokenError, read_token
from handler.remote.discovery import discover_host
from handler.remote.records import Run
from handler.settings import RemoteSettings

log = logs.get("handler.remote.kfp")
T = TypeVar("T")

DEFAULT_TIMEOUT_S: Final = 30.0
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


def _filter_equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


class KfpClient:
    """The KFP calls remote mode needs, built lazily (no I/O until the first call).

    Thread-safe: gunicorn threads and the service's dispatcher share one instance.
    """

    def __init__(self, remote: RemoteSettings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._remote = remote
        self._timeout_s = timeout_s
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
        log.info("kfp client built", extra={"kfp_host": host, "token_source": token.source})
        return _Apis(
            host=host,
            token=token,
            api_client=api_client,
            runs=kfp_server_api.RunServiceApi(api_client),
            experiments=kfp_server_api.ExperimentServiceApi(api_client),
            healthz=kfp_server_api.HealthzServiceApi(api_client),
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
        timeout = timeout_s or self._timeout_s
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

    def runs_named(self, experiment_id: str, display_name: str) -> list[Run]:
        """Every run called ``display_name`` in the experiment, oldest first."""
        reply = self.call(
            f"list runs named {display_name!r}",
            lambda a: _json(
                a.runs.run_service_list_runs(
                    experiment_id=experiment_id,
                    filter=_filter_equals("display_name", display_name),
                    page_size=100,
                    _request_timeout=self._timeout_s,
                    _preload_content=False,
                )
            ),
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
        flt = json.dumps({"predicates": predicates})
        runs: list[Run] = []
        token = ""
        for _ in range(max_pages):
            kwargs: dict[str, Any] = {"page_token": token} if token else {}
            reply = self.call(
                f"list runs in states {','.join(states)}",
                lambda a, kwargs=kwargs: _json(
                    a.runs.run_service_list_runs(
                        experiment_id=experiment_id,
                        filter=flt,
                        page_size=page_size,
                        sort_by="created_at",
                        _request_timeout=self._timeout_s,
                        _preload_content=False,
                        **kwargs,
                    )
                ),
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
        kwargs: dict[str, Any] = {"page_token": token} if token else {}
        reply = self.call(
            "list runs",
            lambda a: _json(
                a.runs.run_service_list_runs(
                    experiment_id=experiment_id,
                    page_size=size,
                    sort_by="created_at desc",
                    _request_timeout=self._timeout_s,
                    _preload_content=False,
                    **kwargs,
                )
            ),
        )
        runs = [Run.parse(r) for r in reply.get("runs") or []]
        return runs, reply.get("next_page_token") or ""

    def create_run(
        self,
        experiment_id: str,
        display_name: str,
        pipeline_spec: dict[str, Any],
        parameters: dict[str, Any],
    ) -> Run:
        body = {  # V2beta1Run as the API reads it (no generated models: see records.py)
            "experiment_id": experiment_id,
            "display_name": display_name,
            "pipeline_spec": pipeline_spec,
            "runtime_config": {"parameters": parameters},
        }
        return self._run(
            f"create run {display_name!r}", lambda a, kw: a.runs.run_service_create_run(body, **kw)
        )

    def get_run(self, run_id: str) -> Run:
        return self._run(
            f"get run {run_id}", lambda a, kw: a.runs.run_service_get_run(run_id, **kw)
        )

    def _run(self, what: str, fn: Callable[[_Apis, dict[str, Any]], Any]) -> Run:
        """One call that answers a run, read as plain JSON (records.py says why)."""
        kw = {"_request_timeout": self._timeout_s, "_preload_content": False}
        return Run.parse(self.call(what, lambda a: _json(fn(a, kw))))

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


def _json(response: Any) -> dict[str, Any]:
    """The body of a raw (``_preload_content=False``) answer, as JSON."""
    try:
        value = json.loads(response.data or b"{}")
    finally:
        response.release_conn()
    return value if isinstance(value, dict) else {}


def _oldest_first(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: (str(r.created_at or ""), r.run_id))


def _operation(what: str) -> str:
    """A call's operation as a metric label: "get run abc" -> "get run"."""
    return " ".join(word for word in what.split()[:2] if word.isalpha()) or "other"


def _measured(operation: str, started: float, exc: BaseException | None) -> None:
    metrics.KFP_CALLS.labels(operation, metrics.outcome(exc)).inc()
    metrics.KFP_SECONDS.labels(operation).observe(time.perf_counter() - started)


def _is_remote_failure(exc: Exception) -> bool:
    import kfp_server_api
    import urllib3

    return isinstance(
        exc, (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError)
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
        apis.api_client.close()
    except Exception:  # closing a broken client must not hide the real problem
        log.debug("closing the kfp api client failed", exc_info=True)
