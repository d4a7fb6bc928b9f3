"""The status blueprint: liveness, readiness and job status as JSON.

``/healthz`` says only that the process answers; ``/readyz`` asks the service (local: the store
and the backend; remote: nothing beyond the process, so a KFP outage reaches the Broker as 503s
instead of taking the pod out of rotation); ``/jobs`` (paged: ``page_size``, ``page_token``) and
``/jobs/<job_uuid>`` answer in the job.status.json shape that emitted events carry.
"""

from __future__ import annotations

from typing import Any, Final

from flask import Blueprint, Response, current_app, jsonify, request

from handler import EXTENSION
from handler.errors import BadRequest
from handler.services import Service

bp = Blueprint("status", __name__)

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200


def _service() -> Service:
    return current_app.extensions[EXTENSION]


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[Response, int, dict[str, str]] | dict[str, Any]:
    service = _service()
    problems = service.readiness()
    if problems:
        body = {"status": "unavailable", "problems": problems}
        return jsonify(body), 503, {"Retry-After": str(service.settings.retry_after_s)}
    return {"status": "ready", "mode": service.settings.mode}


def _page_size() -> int:
    raw = request.args.get("page_size", "")
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise BadRequest(f"page_size {raw!r}: expected an integer from 1 to {MAX_PAGE_SIZE}")
    return int(raw)


@bp.get("/jobs")
def jobs() -> dict[str, Any]:
    page = _service().jobs(request.args.get("page_token", ""), _page_size())
    body: dict[str, Any] = {"jobs": page.jobs}
    if page.next_page_token:
        body["next_page_token"] = page.next_page_token
    return body


@bp.get("/jobs/<job_uuid>")
def job(job_uuid: str) -> tuple[Response, int] | dict[str, Any]:
    found = _service().job(job_uuid)
    if found is None:
        return jsonify({"error": "not_found", "message": f"no job with job_uuid {job_uuid!r}"}), 404
    return found
