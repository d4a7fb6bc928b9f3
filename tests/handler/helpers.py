"""Request builders for handler/ tests (the loopback parts live in tests.support)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from handler import contract
from tests.support.http_client import ce_headers
from tests.support.jobs import job_request


def request_data(job_uuid: str, dataset: Path, **overrides: Any) -> dict[str, Any]:
    """A valid job.requested payload for the tiny model (model resolved from the store)."""
    return job_request(job_uuid, str(dataset), **overrides)


def binary(event_type: str, data: Any, *, event_id: str = "e-1", subject: str | None = None):
    """Headers and body of a binary-mode request event built by hand (not via make_event)."""
    return ce_headers(event_type, event_id, subject=subject), json.dumps(data).encode()


def requested_message(data: dict[str, Any], *, structured: bool = False):
    event = contract.make_event(contract.JOB_REQUESTED, "/tests", data)
    return contract.to_http(event, structured=structured)


def cancel_message(job_uuid: str):
    event = contract.make_event(contract.JOB_CANCEL_REQUESTED, "/tests", {"job_uuid": job_uuid})
    return contract.to_http(event)
