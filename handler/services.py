"""The two services behind the same routes, chosen by one lookup on the mode.

``local`` (handler/service.py): one process, SQLite store, dispatcher and outbox threads.
``remote`` (handler/remote/service.py): no state at all; KFP and S3 are the record and the
Broker is the outbox. Both decode with ``ingress``, refuse with ``errors`` and reply with
``reply``; the routes (events.py, status.py) talk to either through :class:`Service`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Final, Protocol

from cloudevents.core.bindings.http import HTTPMessage

from handler.reply import Reply
from handler.settings import HandlerSettings

SERVICES: Final[dict[str, str]] = {
    "local": "handler.service:create_service",
    "remote": "handler.remote.service:RemoteService",
}


@dataclass(frozen=True)
class JobsPage:
    """One page of ``GET /jobs``: job statuses and the token of the next page ("" = last)."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    next_page_token: str = ""


class Service(Protocol):
    """What the routes need of a service."""

    settings: HandlerSettings

    def handle(self, message: HTTPMessage, caller: str = "") -> Reply:
        """Answer one inbound event; never raises. ``caller``: the sender's identity when
        identity checks are on (handler/identity.py), which a per-caller limit counts by."""
        ...

    def job(self, job_uuid: str) -> dict[str, Any] | None:
        """The job's status (job.status.json shape), or None when there is no such job."""
        ...

    def jobs(self, page_token: str = "", page_size: int = 50) -> JobsPage: ...

    def readiness(self) -> dict[str, str]:
        """Problems keyed by component; empty when ready (backs /readyz)."""
        ...

    def start_once(self) -> None:
        """Start what runs between requests (idempotent); called as a worker boots."""
        ...

    def stop(self, timeout: float = 10.0) -> None: ...


def build_service(settings: HandlerSettings) -> Service:
    """The service for ``settings.mode``; builds clients and stores, starts nothing."""
    module_name, _, attr = SERVICES[settings.mode].partition(":")
    return getattr(import_module(module_name), attr)(settings)
