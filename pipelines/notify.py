"""The exit task's run-finished notice: one binary-mode CloudEvent POSTed to ``notify_url``.

The notice is a hint (the receiver re-reads the run before acting), so a delivery failure is
logged and retried with a capped exponential backoff for ``window_s`` (default five minutes),
then given up on. It never fails the pipeline. The window is what makes a notice survive a
handler being replaced: the run stays unfinished while its exit task retries, so the new
handler's PingSource ticks (every two minutes) adopt it even when the notice never gets
through, and then announce its end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Final

from pipelines.logs import event
from pipelines.sa_token import AudienceToken, TokenUnavailable, bearer_for
from pipelines.settings import NOTIFY_WINDOW_S

log = logging.getLogger(__name__)

SOURCE = "kfp-pipeline"
SERVICE_NAME: Final = "kfp-trainer-notify"
TRACER: Final = "pipelines"


def notice(job_uuid: str, run_id: str, state: str, error: str | None) -> dict[str, Any]:
    """The notice body: job_uuid, run_id (when known), state, error."""
    body: dict[str, Any] = {"job_uuid": job_uuid, "state": state, "error": error or None}
    if run_id:
        body["run_id"] = run_id
    return body


def headers(
    event_type: str, job_uuid: str, trace: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Binary-mode CloudEvent attributes as ``ce-*`` headers (deterministic id), with the
    distributed-tracing extension's ``traceparent``/``tracestate`` when ``trace`` has them."""
    out = {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": SOURCE,
        "ce-id": f"{job_uuid}/run.finished",
        "ce-subject": job_uuid,
        "content-type": "application/json",
    }
    out.update({f"ce-{k}": v for k, v in (trace or {}).items() if v})
    return out


def post_run_finished(
    notify_url: str,
    event_type: str,
    job_uuid: str,
    run_id: str,
    state: str,
    error: str | None,
    *,
    window_s: float = NOTIFY_WINDOW_S,
    timeout_s: float = 10.0,
    trace: Mapping[str, str] | None = None,
    token_audience: str = "",
) -> bool:
    """POST the notice; True when the receiver accepted it (2xx). Never raises.

    Retries what a receiver may take later (no answer, 404, 408, 409, 429, 5xx, no token to be
    had) until ``window_s`` has passed; any other refusal is final. ``trace`` is the job's trace
    context: a ``notify`` span continues it and the notice carries that span's. With
    ``token_audience`` each POST carries the pod's token for it (pipelines/sa_token.py).
    """
    from pipelines import logs, tracing

    logs.configure(os.environ.get("KFP_TRAINER_LOG_LEVEL", "INFO"))
    logs.set_job(job_uuid, trace)
    tracing.init(SERVICE_NAME)
    try:
        attributes = {"job_uuid": job_uuid, "state": state}
        with tracing.span(TRACER, "notify", parent=trace, attributes=attributes):
            return _post(
                notify_url,
                event_type,
                job_uuid,
                run_id,
                state,
                error,
                window_s=window_s,
                timeout_s=timeout_s,
                trace=tracing.carrier(),
                token=bearer_for(token_audience),
            )
    finally:
        tracing.flush()


def _post(
    notify_url: str,
    event_type: str,
    job_uuid: str,
    run_id: str,
    state: str,
    error: str | None,
    *,
    window_s: float,
    timeout_s: float,
    trace: Mapping[str, str],
    token: AudienceToken | None,
) -> bool:
    if not notify_url:
        event(log, "no notify_url; run-finished notice skipped", job_uuid=job_uuid, state=state)
        return False
    import requests

    body = json.dumps(notice(job_uuid, run_id, state, error)).encode()
    hdrs = headers(event_type, job_uuid, trace)
    deadline = time.monotonic() + window_s
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            auth = token.header() if token is not None else {}
            resp = requests.post(notify_url, data=body, headers={**hdrs, **auth}, timeout=timeout_s)
            if resp.status_code < 300:
                event(
                    log,
                    "run-finished notice delivered",
                    job_uuid=job_uuid,
                    state=state,
                    status=resp.status_code,
                )
                return True
            retry = resp.status_code in (404, 408, 409, 429) or resp.status_code >= 500
            event(
                log,
                "run-finished notice refused",
                level=logging.WARNING,
                job_uuid=job_uuid,
                status=resp.status_code,
                attempt=attempt,
            )
            if not retry:
                return False
        except (requests.RequestException, TokenUnavailable) as exc:
            event(
                log,
                "run-finished notice not delivered",
                level=logging.WARNING,
                job_uuid=job_uuid,
                error=str(exc),
                attempt=attempt,
            )
        if time.monotonic() + delay > deadline:
            event(
                log,
                "run-finished notice given up",
                level=logging.WARNING,
                job_uuid=job_uuid,
                attempts=attempt,
                window_s=window_s,
            )
            return False
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


__all__ = ["SOURCE", "headers", "notice", "post_run_finished"]
