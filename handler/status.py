"""The status blueprint: liveness, readiness and job status as JSON.

``/healthz`` says only that the process answers; ``/readyz`` checks the store and the backend
(Knative's readiness probe, so a pod that cannot accept work gets no traffic); ``/jobs`` and
``/jobs/<job_uuid>`` answer in the job.status.json shape that emitted events carry.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from handler import EXTENSION
from handler.service import HandlerService

bp = Blueprint("status", __name__)


def _service() -> HandlerService:
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
    return {"status": "ready", "backend": service.backend.name}


@bp.get("/jobs")
def jobs() -> dict[str, Any]:
    return {"jobs": _service().jobs()}


@bp.get("/jobs/<job_uuid>")
def job(job_uuid: str) -> tuple[Response, int] | dict[str, Any]:
    found = _service().job(job_uuid)
    if found is None:
        return jsonify({"error": "not_found", "message": f"no job with job_uuid {job_uuid!r}"}), 404
    return found
