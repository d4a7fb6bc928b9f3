"""The handler's Prometheus metrics and the ``GET /metrics`` blueprint that serves them.

Under gunicorn every worker is its own process, so the metrics use prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` holds one file per worker, ``/metrics`` (on
whichever worker answers) sums them, and ``child_exit`` in handler/gunicorn_conf.py marks a
dead worker's files (gunicorn_conf sets the directory when the deployment does not). Without the
variable (tests' Flask client, the provider's in-process handler) the process's own registry is
served. Event types in labels are the contract's, anything else is ``other``, so a sender
cannot grow the label set.
"""

from __future__ import annotations

import os
import time
from typing import Final

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from handler import contract

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_KNOWN_TYPES: Final = frozenset((*contract.CONSUMED_TYPES, *contract.EMITTED_TYPES))

EVENTS_RECEIVED: Final = Counter(
    "kfp_trainer_events_received",
    "CloudEvents POSTed to the handler, by type and the HTTP status answered.",
    ("type", "status"),
)
REQUEST_SECONDS: Final = Histogram(
    "kfp_trainer_request_duration_seconds",
    "Time from request to answer, by method and route.",
    ("method", "route"),
)
KFP_CALLS: Final = Counter(
    "kfp_trainer_kfp_api_calls",
    "Calls to the KFP API, by operation and outcome (ok, or the error class).",
    ("operation", "outcome"),
)
KFP_SECONDS: Final = Histogram(
    "kfp_trainer_kfp_api_call_duration_seconds",
    "Time a KFP API call took, by operation.",
    ("operation",),
)
S3_CALLS: Final = Counter(
    "kfp_trainer_s3_calls",
    "Calls to S3, by operation and outcome (ok, or the error class).",
    ("operation", "outcome"),
)
JOBS_SUBMITTED: Final = Counter("kfp_trainer_jobs_submitted", "Runs started for jobs.")
JOBS_ENDED: Final = Counter(
    "kfp_trainer_jobs_ended", "Jobs that reached a terminal state, by state.", ("state",)
)
EVENTS_EMITTED: Final = Counter(
    "kfp_trainer_events_emitted", "Events the handler emitted, by type.", ("type",)
)
DELIVERY_FAILURES: Final = Counter(
    "kfp_trainer_event_delivery_failures",
    "Failed attempts to deliver an emitted event to the sink, by type.",
    ("type",),
)

bp = Blueprint("metrics", __name__)


def event_label(event_type: str | None) -> str:
    """An event type as a label value: the contract's short name, ``other`` or ``none``."""
    if not event_type:
        return "none"
    return event_type.removeprefix(contract.PREFIX) if event_type in _KNOWN_TYPES else "other"


def outcome(exc: BaseException | None) -> str:
    """``ok``, or the class name of the error a call ended with."""
    return "ok" if exc is None else type(exc).__name__


def registry() -> CollectorRegistry:
    """What ``/metrics`` serves: every worker's files in multiprocess mode, else this process."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry()), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _started() -> None:
    g.kfp_trainer_started = time.perf_counter()


def _finished(response: Response) -> Response:
    started = g.pop("kfp_trainer_started", None)
    if started is not None and request.url_rule is not None:
        route = request.url_rule.rule
        if route != "/metrics":
            REQUEST_SECONDS.labels(request.method, route).observe(time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Serve ``/metrics`` and time every request."""
    app.before_request(_started)
    app.after_request(_finished)
    app.register_blueprint(bp)


__all__ = [
    "DELIVERY_FAILURES",
    "EVENTS_EMITTED",
    "EVENTS_RECEIVED",
    "JOBS_ENDED",
    "JOBS_SUBMITTED",
    "KFP_CALLS",
    "KFP_SECONDS",
    "REQUEST_SECONDS",
    "S3_CALLS",
    "event_label",
    "init_app",
    "outcome",
    "registry",
]
