"""Every problem the handler answers with, and the one table that maps problems to HTTP statuses.

Ingress code raises these (or the contract's ``ContractError``, the store's ``StoreUnavailable``,
a backend's ``BackendUnavailable``/``BackendRejected``); :func:`error_reply` is the only place
that turns an exception into a status code and a JSON body. Permanent problems are 400, 413 or
415, never 404, 409 or 429, which Knative would retry forever; a caller that may not call gets
401 or 403 (dead-lettered too, so a misconfigured sender shows up there). 429 means one thing:
the caller is at its limit of active runs, and the request is to wait. Bodies name the problem;
internal details (paths, exception text of unexpected errors) stay in the logs.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final

from handler import logs
from handler.backends.base import BackendRejected, BackendUnavailable
from handler.contract import ContractError
from handler.reply import Reply, flask_response, json_reply
from handler.store import StoreUnavailable

if TYPE_CHECKING:
    from flask import Flask

log = logs.get("handler.errors")

EXPECTED: Final = (
    "this endpoint expects one CloudEvent, in binary mode (ce-specversion, ce-id, ce-source and "
    "ce-type headers, a JSON body, Content-Type application/json) or in structured mode "
    "(Content-Type application/cloudevents+json)"
)


class BadRequest(ValueError):
    """A permanent problem with the request (400); ``problems`` lists each one."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class PayloadTooLarge(ValueError):
    """The body is over ``max_body_bytes`` (413)."""


class UnsupportedMediaType(ValueError):
    """The content type is not one this endpoint reads (415), batch mode included."""


class Unauthenticated(ValueError):
    """No bearer token, or one the Kubernetes API does not vouch for (401)."""


class Forbidden(ValueError):
    """The caller is known, but not one the settings let do this (403)."""


class TooManyRuns(RuntimeError):
    """The caller has as many active runs as it may (429 with Retry-After: Knative redelivers,
    so the request waits for a run of the caller's to end). Names the caller, not its jobs."""

    def __init__(self, caller: str, limit: int) -> None:
        super().__init__(
            f"{caller} has {limit} unfinished jobs, as many as KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS "
            "allows; this request is taken once one of them ends (retry later)"
        )


class Unavailable(RuntimeError):
    """Something the handler needs is down for now (503 with Retry-After)."""


# (exception class, status, error code, whether str(exc) is safe to show the sender)
_TABLE: Final = (
    (PayloadTooLarge, 413, "payload_too_large", True),
    (UnsupportedMediaType, 415, "unsupported_media_type", True),
    (Unauthenticated, 401, "unauthenticated", True),
    (Forbidden, 403, "forbidden", True),
    (TooManyRuns, 429, "too_many_runs", True),
    (ContractError, 400, "bad_request", True),
    (BadRequest, 400, "bad_request", True),
    (BackendRejected, 400, "rejected", True),
    (Unavailable, 503, "unavailable", True),
    (StoreUnavailable, 503, "store_unavailable", False),
    (BackendUnavailable, 503, "backend_unavailable", False),
)
_HIDDEN: Final = {
    "store_unavailable": "the job store is unavailable right now; retry later",
    "backend_unavailable": "the pipeline backend is unavailable right now; retry later",
}


def error_reply(exc: BaseException, *, retry_after_s: int = 5) -> Reply:
    """The one mapping from a problem to an HTTP answer with a JSON body naming it."""
    for cls, status, code, shown in _TABLE:
        if isinstance(exc, cls):
            message = str(exc) if shown else _HIDDEN[code]
            body: dict[str, object] = {"error": code, "message": message}
            problems = getattr(exc, "problems", None)
            if problems and len(problems) > 1:
                body["problems"] = list(problems)
            headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else {}
            if status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="kfp-trainer"'
            if status == 503:
                log.warning("answering 503", extra={"error": code, "detail": str(exc)})
            return json_reply(status, body, headers)
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error", exc_info=exc, extra={"ref": ref})
    return json_reply(
        500,
        {"error": "internal_error", "message": f"internal error (ref {ref}); see handler logs"},
    )


def init_app(app: Flask) -> None:
    """JSON bodies for errors raised outside ``handle``: Flask's own and the status views'."""
    from flask import Response
    from werkzeug.exceptions import HTTPException

    def http_error(exc: HTTPException) -> tuple[dict[str, str], int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return {"error": code, "message": exc.description or exc.name}, exc.code or 500

    def other_error(exc: Exception) -> Response:
        settings = app.config.get("KFP_TRAINER_SETTINGS")
        return flask_response(error_reply(exc, retry_after_s=getattr(settings, "retry_after_s", 5)))

    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, other_error)
