"""Who is calling: a bearer token the Kubernetes API vouches for, admitted per action.

Knative Eventing's ``authentication-oidc`` feature gives each Trigger and source a service
account and sends a token for the subscriber's audience; the pipeline pods and the llama-stack
server send projected service-account tokens of their own. The handler asks the API server whose
token it is (TokenReview, for the handler's own audience), then admits the service accounts its
settings list for what the request does (:class:`Action`). ``/healthz`` and ``/readyz`` stay
open: the kubelet probes without a token.

Off unless ``KFP_TRAINER_AUTH=true`` (``AuthSettings``); :func:`init_app` then adds one
``before_request`` hook, and the ingest view asks :func:`authorize_event` about the event type.
Answers say what is wrong with the token or the caller and nothing about any job.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import requests
from cloudevents.core.bindings.http import HTTPMessage
from flask import Flask, Response, current_app, g, request

from handler import contract, logs
from handler.errors import Forbidden, Unauthenticated, Unavailable, error_reply
from handler.ingress import STRUCTURED, media_type
from handler.reply import flask_response
from handler.settings import AuthSettings

log = logs.get("handler.identity")

EXTENSION: Final = "kfp_trainer_identity"
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
TOKENREVIEWS: Final = "/apis/authentication.k8s.io/v1/tokenreviews"
_CACHE_MAX: Final = 4096  # reviews remembered per process; a flood of tokens cannot grow it


class Action(StrEnum):
    """What a request does, and so which caller list may do it."""

    REQUEST = "request"  # job.requested, job.cancel.requested
    NOTIFY = "notify"  # run.finished
    RECONCILE = "reconcile"  # the PingSource tick
    READ = "read"  # GET /jobs, GET /jobs/<job_uuid>


_DOING: Final = {
    Action.REQUEST: "request or cancel jobs",
    Action.NOTIFY: "send run.finished notices",
    Action.RECONCILE: "send reconcile ticks",
    Action.READ: "read job status",
}
EVENT_ACTIONS: Final = {
    contract.JOB_REQUESTED: Action.REQUEST,
    contract.JOB_CANCEL_REQUESTED: Action.REQUEST,
    contract.RUN_FINISHED: Action.NOTIFY,
    contract.PING: Action.RECONCILE,
}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as the TokenReview named it."""

    username: str  # system:serviceaccount:<namespace>:<name>
    uid: str = ""


class ReviewUnavailable(Unavailable):
    """The Kubernetes API could not say whose token it is right now (503 with Retry-After)."""


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    :raises Unauthenticated: no header, another scheme, or an empty token.
    """
    scheme, _, token = (header or "").strip().partition(" ")
    if not header:
        raise Unauthenticated("this endpoint needs an Authorization: Bearer <token> header")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class Policy:
    """Which service accounts may do which :class:`Action` (from ``AuthSettings``)."""

    def __init__(self, settings: AuthSettings) -> None:
        self._allowed: dict[Action, frozenset[str]] = {
            Action.REQUEST: frozenset(settings.requesters),
            Action.NOTIFY: frozenset(settings.notifiers),
            Action.RECONCILE: frozenset(settings.reconcilers),
            Action.READ: frozenset(settings.readers),
        }
        self._known = frozenset().union(*self._allowed.values())

    def check(self, caller: Caller, action: Action | None) -> None:
        """:raises Forbidden: ``caller`` may not do ``action`` (None: anything at all)."""
        allowed = self._known if action is None else self._allowed[action]
        if caller.username not in allowed:
            log.warning(
                "caller refused",
                extra={"caller": caller.username, "action": action and action.value},
            )
            what = _DOING[action] if action else "call this handler"
            raise Forbidden(f"{caller.username} may not {what}")


class TokenReviewer:
    """Asks the Kubernetes API whose token it is; answers are remembered for ``cache_s``.

    The handler's own token is re-read for every review (the kubelet rotates it). Refusals are
    remembered as well, so a token sent again and again costs the API server one review per
    ``cache_s``; an outage is never remembered.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._session = requests.Session()
        self._cache: dict[str, tuple[float, Caller | str]] = {}
        self._lock = threading.Lock()

    def review(self, token: str) -> Caller:
        """:raises Unauthenticated: the API server does not vouch for ``token`` for our audience.
        :raises ReviewUnavailable: the API server could not be asked."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            answer = cached[1]
        else:
            answer = self._ask(token)
            self._remember(key, now + self.settings.cache_s, answer)
        if isinstance(answer, str):
            raise Unauthenticated(answer)
        return answer

    def _remember(self, key: str, until: float, answer: Caller | str) -> None:
        if self.settings.cache_s <= 0:
            return
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                now = time.monotonic()
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
            self._cache[key] = (until, answer)

    def _own_token(self) -> str:
        path = Path(self.settings.token_path)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.error(
                "cannot read the handler's own token (KFP_TRAINER_AUTH_TOKEN_PATH)",
                extra={"path": str(path), "problem": exc.strerror or str(exc)},
            )
            raise self._unavailable() from None
        if not value:
            log.error("the handler's own token file is empty", extra={"path": str(path)})
            raise self._unavailable()
        return value

    def _unavailable(self) -> ReviewUnavailable:
        return ReviewUnavailable(
            "the caller's token cannot be checked right now (the Kubernetes API is not "
            "reachable from the handler); retry later"
        )

    def _ask(self, token: str) -> Caller | str:
        """The caller, or the reason the token was refused (a string)."""
        audience = self.settings.audience
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        url = self.settings.api_url + TOKENREVIEWS
        try:
            reply = self._session.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {self._own_token()}"},
                # Per request: a session's own `verify` loses to REQUESTS_CA_BUNDLE.
                verify=self.settings.ca_path,
                timeout=self.settings.timeout_s,
            )
        except (requests.RequestException, OSError) as exc:
            log.warning(
                "TokenReview failed", extra={"url": url, "problem": f"{type(exc).__name__}: {exc}"}
            )
            raise self._unavailable() from None
        if reply.status_code not in (200, 201):
            hint = {
                401: "the API server refused the handler's own token",
                403: "the handler may not create TokenReviews: bind its service account to "
                "the ClusterRole system:auth-delegator",
            }.get(reply.status_code, "unexpected answer")
            log.error(
                "TokenReview refused",
                extra={"url": url, "status": reply.status_code, "problem": hint},
            )
            raise self._unavailable()
        try:
            status: dict[str, Any] = reply.json().get("status") or {}
        except (ValueError, AttributeError):
            log.error("TokenReview answer is not a TokenReview", extra={"url": url})
            raise self._unavailable() from None
        user = status.get("user") or {}
        if status.get("authenticated") is not True or not user.get("username"):
            log.info("token refused", extra={"reason": status.get("error") or "not authenticated"})
            return (
                "the bearer token was not accepted (expired, for another audience, or not "
                "issued by this cluster)"
            )
        if audience not in (status.get("audiences") or []):
            # An API server that ignores spec.audiences vouches for its own audience only.
            log.info("token not for this audience", extra={"audiences": status.get("audiences")})
            return f"the bearer token is not for audience {audience!r}"
        return Caller(username=str(user["username"]), uid=str(user.get("uid") or ""))


def event_type(message: HTTPMessage) -> str | None:
    """The CloudEvent type of an inbound message (binary or structured), None when unclear."""
    headers = {k.lower(): v for k, v in message.headers.items()}
    if headers.get("ce-type"):
        return headers["ce-type"]
    if media_type(headers) == STRUCTURED:
        try:
            value = json.loads(message.body)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            return value["type"]
    return None


def route_action(method: str, path: str) -> Action | None:
    """What a request does by its route alone (None: ``POST /``, decided by the event type)."""
    if path == "/jobs" or path.startswith("/jobs/"):
        return Action.READ if method in ("GET", "HEAD") else None
    return None


@dataclass(frozen=True)
class Identity:
    """The reviewer and the policy of one app."""

    reviewer: TokenReviewer
    policy: Policy
    retry_after_s: int

    def caller(self, authorization: str | None) -> Caller:
        return self.reviewer.review(bearer_token(authorization))


def _reply(exc: Exception, retry_after_s: int) -> Response:
    return flask_response(error_reply(exc, retry_after_s=retry_after_s))


def init_app(app: Flask, settings: AuthSettings, retry_after_s: int) -> None:
    """Require a bearer token on every route but the health ones (when ``settings.enabled``)."""
    if not settings.enabled:
        return
    identity = Identity(TokenReviewer(settings), Policy(settings), retry_after_s)
    app.extensions[EXTENSION] = identity

    def check_caller() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        try:
            caller = identity.caller(request.headers.get("Authorization"))
            action = route_action(request.method, request.path)
            if action is not None or not (request.method == "POST" and request.path == "/"):
                identity.policy.check(caller, action)
        except (Unauthenticated, Forbidden, Unavailable) as exc:
            return _reply(exc, retry_after_s)
        g.kfp_trainer_caller = caller
        return None

    # First of all hooks: nothing (not even the service's start) runs for a refused caller.
    app.before_request_funcs.setdefault(None, []).insert(0, check_caller)


def authorize_event(message: HTTPMessage) -> Response | None:
    """The answer refusing this event to the current caller, or None to go on.

    None as well when identity checks are off. An event of a type the handler does not take
    goes on (the ingest path answers 400) when the caller is on any list.
    """
    identity: Identity | None = current_app.extensions.get(EXTENSION)
    if identity is None:
        return None
    action = EVENT_ACTIONS.get(event_type(message) or "")
    try:
        identity.policy.check(g.kfp_trainer_caller, action)
    except Forbidden as exc:
        return _reply(exc, identity.retry_after_s)
    return None


def current_caller() -> Caller | None:
    """The caller of the request being handled (None with identity checks off)."""
    return g.get("kfp_trainer_caller")


__all__ = [
    "Action",
    "Caller",
    "Policy",
    "ReviewUnavailable",
    "TokenReviewer",
    "authorize_event",
    "bearer_token",
    "current_caller",
    "event_type",
    "init_app",
]
