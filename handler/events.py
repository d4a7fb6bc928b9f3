"""The ingest blueprint: ``POST /`` hands the raw HTTP message to the service, nothing more.

Flask supplies headers and body; decoding, validation and the answer are the service's
(``Service.handle``, handler/services.py), so the in-process path and the HTTP path cannot
drift apart. The only checks here are the one that must happen before the body is read (its
declared size) and whether this caller may send this type of event (handler/identity.py; off
unless configured). Each answer is counted by event type and status (handler/metrics.py).
"""

from __future__ import annotations

import json

from cloudevents.core.bindings.http import HTTPMessage
from flask import Blueprint, Response, current_app, request

from handler import EXTENSION, identity
from handler.errors import PayloadTooLarge, error_reply
from handler.ingress import STRUCTURED, check_size, media_type
from handler.metrics import EVENTS_RECEIVED, event_label
from handler.reply import flask_response
from handler.services import Service

bp = Blueprint("events", __name__)


@bp.post("/")
def receive() -> Response:
    service: Service = current_app.extensions[EXTENSION]
    limit = service.settings.max_body_bytes
    try:
        if request.content_length is not None:
            check_size(request.content_length, limit)
        body = request.stream.read(limit + 1)  # one byte over is enough to know
        check_size(len(body), limit)
    except PayloadTooLarge as exc:
        return _counted(None, flask_response(error_reply(exc)))
    message = HTTPMessage(headers=dict(request.headers.items()), body=body)
    event_type = _inbound_type(message)
    refused = identity.authorize_event(message)  # None: identity checks off, or admitted
    if refused is not None:
        return _counted(event_type, refused)
    caller = identity.current_caller()
    reply = service.handle(message, caller.username if caller else "")
    return _counted(event_type, flask_response(reply))


def _inbound_type(message: HTTPMessage) -> str | None:
    """The event's type for the metrics: the ce-type header, or a structured body's type."""
    found = request.headers.get("ce-type")
    if found is None and media_type(message.headers) == STRUCTURED:
        try:
            found = json.loads(message.body).get("type")
        except (ValueError, AttributeError):
            return None
    return found if isinstance(found, str) else None


def _counted(event_type: str | None, response: Response) -> Response:
    EVENTS_RECEIVED.labels(event_label(event_type), str(response.status_code)).inc()
    return response
