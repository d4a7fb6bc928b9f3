"""Remote transport: binary-mode POSTs to the Knative broker, status from the handler's REST.

A Knative Service may scale to zero, so there is no subscription to hold open: while a job is
not terminal, reads ask ``GET <handler_url>/jobs/<job_uuid>`` (any replica can answer; in remote
mode it reads KFP), throttled by ``status_refresh_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from provider.config import KfpTrainerConfig
from provider.transport import Answer, DeliveryFailed, Update, deliver, reason


class RemoteTransport:
    """Talks HTTP to the broker (events in) and the handler (status out)."""

    polls = True

    def __init__(self, config: KfpTrainerConfig) -> None:
        self._config = config
        self._session: Any = None

    def start(self, on_update: Callable[[Update], object]) -> None:
        import requests

        self._session = requests.Session()

    def stop(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _http(self) -> Any:
        if self._session is None:
            self.start(lambda _update: None)
        return self._session

    def send(self, event: Any) -> list[Update]:
        """POST ``event`` in binary mode to the broker, retrying what Knative would retry."""
        from handler import contract

        message = contract.to_http(event)
        config = self._config

        def once() -> Answer:
            reply = self._http().post(
                config.broker_url,
                headers=dict(message.headers),
                data=message.body,
                timeout=config.http_timeout_s,
            )
            return Answer(reply.status_code, dict(reply.headers), reply.content)

        return deliver(
            once,
            attempts=config.delivery_attempts,
            backoff_s=config.delivery_backoff_s,
            what=f"{event.get_type()} for job {event.get_subject()!r} to {config.broker_url}",
        )

    def problems(self) -> list[str]:
        url = f"{self._config.handler_url.rstrip('/')}/readyz"
        try:
            reply = self._http().get(url, timeout=min(self._config.http_timeout_s, 0.8))
        except OSError as exc:
            return [f"handler {url} unreachable: {type(exc).__name__}"]
        return [] if reply.status_code == 200 else [f"handler {url}: {reason(reply.content)}"]

    def job(self, job_uuid: str) -> Update | None:
        """The handler's view of one job; None when it answers 404."""
        url = f"{self._config.handler_url.rstrip('/')}/jobs/{quote(job_uuid, safe='')}"
        try:
            reply = self._http().get(url, timeout=self._config.http_timeout_s)
        except OSError as exc:
            raise DeliveryFailed(f"handler {url} unreachable: {exc}") from exc
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise DeliveryFailed(
                f"handler {url} answered {reply.status_code}: {reason(reply.content)}"
            )
        return reply.json()
