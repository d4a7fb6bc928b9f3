"""From an HTTP message to a contract event, or to an error that names the problem.

Framework-free: the Flask view and in-process callers both hand over a
``cloudevents.core.bindings.http.HTTPMessage``. Checks run cheapest first (size, content type,
required attributes) so a bad request costs little; the contract module does the decoding and
the schema validation.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final

from cloudevents.core.bindings.http import HTTPMessage

from handler import contract
from handler.errors import EXPECTED, BadRequest, PayloadTooLarge, UnsupportedMediaType

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
_JSON_MEDIA: Final = re.compile(r"^(application|text)/([a-z0-9.\-]+\+)?json$")
_REQUIRED: Final = ("specversion", "id", "source", "type")
_NEEDS_DATA: Final = (contract.JOB_REQUESTED, contract.JOB_CANCEL_REQUESTED, contract.RUN_FINISHED)


def media_type(headers: dict[str, str]) -> str:
    """The lower-cased media type of Content-Type, without parameters ('' when absent)."""
    for key, value in headers.items():
        if key.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower()
    return ""


def check_size(length: int, limit: int) -> None:
    """:raises PayloadTooLarge: ``length`` is over ``limit`` bytes."""
    if length > limit:
        raise PayloadTooLarge(
            f"request body is {length} bytes; the limit is {limit} bytes "
            "(KFP_TRAINER_MAX_BODY_BYTES). Datasets and models travel by URI, not inline"
        )


def _check_binary(headers: dict[str, str], ctype: str) -> None:
    if ctype and not _JSON_MEDIA.match(ctype):
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not supported: binary-mode event data must be JSON "
            "(Content-Type: application/json)"
        )
    missing = [f"ce-{a}" for a in _REQUIRED if not headers.get(f"ce-{a}", "").strip()]
    if missing:
        raise BadRequest(f"missing CloudEvent attribute header(s): {', '.join(missing)}")
    version = headers["ce-specversion"]
    if version != "1.0":
        raise BadRequest(f"ce-specversion {version!r} is not supported; use '1.0'")


def _check_structured(body: bytes) -> None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(
            f"a structured-mode body must be one CloudEvent (a JSON object), got "
            f"{type(value).__name__}"
        )
    missing = [a for a in _REQUIRED if not isinstance(value.get(a), str) or not value.get(a)]
    if missing:
        raise BadRequest(f"missing CloudEvent attribute(s): {', '.join(missing)}")
    if value["specversion"] != "1.0":
        raise BadRequest(f"specversion {value['specversion']!r} is not supported; use '1.0'")
    dct = str(value.get("datacontenttype") or contract.JSON_CONTENT_TYPE).split(";")[0].lower()
    if not _JSON_MEDIA.match(dct.strip()):
        raise UnsupportedMediaType(
            f"datacontenttype {dct!r} is not supported: event data must be JSON (application/json)"
        )


def decode(message: HTTPMessage, *, max_body_bytes: int) -> contract.JobEvent:
    """Check and decode one inbound event.

    :raises PayloadTooLarge: body over ``max_body_bytes``.
    :raises UnsupportedMediaType: batch mode, or a content type that is not a JSON CloudEvent.
    :raises BadRequest: not a CloudEvent, missing or bad attributes, invalid JSON.
    :raises contract.ContractError: unknown type, or data that breaks the type's schema.
    """
    check_size(len(message.body), max_body_bytes)
    headers = {k.lower(): v for k, v in message.headers.items()}
    ctype = media_type(headers)
    if ctype == BATCH:
        raise UnsupportedMediaType(
            f"batch mode ({BATCH}) is not supported; send one event per request"
        )
    if any(k.startswith("ce-") for k in headers):
        _check_binary(headers, ctype)
    elif ctype == STRUCTURED:
        _check_structured(message.body)
    elif ctype == "" or _JSON_MEDIA.match(ctype):
        raise BadRequest(f"not a CloudEvent; {EXPECTED}")
    else:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not supported; {EXPECTED}")
    event = contract.from_http(headers, message.body)
    kind = event.get_type()
    if event.get_data() in (None, b"", "") and kind in _NEEDS_DATA:
        raise BadRequest(f"event data is missing: {kind} needs a JSON object")
    return contract.parse_event(event)


def digest(data: dict[str, Any]) -> str:
    """Content digest of a request's data: equal for a redelivery, different for a changed one."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
