"""What the handler answers: a framework-free HTTP reply, built by the service, sent by Flask."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudevents.core.base import BaseCloudEvent

from handler.contract import to_http

if TYPE_CHECKING:
    from flask import Response


@dataclass(frozen=True)
class Reply:
    """Status, headers and body of an answer; ``event`` is set when the body is a CloudEvent."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    event: BaseCloudEvent | None = None

    def json(self) -> Any:
        """The body decoded as JSON (for callers that got a JSON answer)."""
        return json.loads(self.body) if self.body else None


def json_reply(status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(value, separators=(",", ":")).encode()
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, body)


def event_reply(event: BaseCloudEvent, status: int = 200) -> Reply:
    """A binary-mode CloudEvent reply: what a Knative broker routes on."""
    message = to_http(event)
    return Reply(status, dict(message.headers), message.body, event)


def flask_response(reply: Reply) -> Response:
    """The reply as Flask sends it: the one place a Reply meets the framework (imported here,
    when called, so the service side stays free of it)."""
    from flask import Response

    return Response(reply.body, status=reply.status, headers=reply.headers)
