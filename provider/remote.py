"""Remote transport: binary-mode POSTs to the Knative broker, status from the handler's REST.

Each request can carry a bearer token read from a file (``broker_token_file``,
``handler_token_file``): with Knative's OIDC and the handler's identity checks on, the Broker and
the handler each want a token for their own audience.

A Knative Service may scale to zero, so there is no subscription to hold open: while a job is
not terminal, reads ask ``GET <handler_url>/jobs/<job_uuid>`` (any replica can answer; in remote
mode it reads KFP), throttled by ``status_refresh_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from provider.config import KfpTrainerConfig
from provider.transport import Answer, DeliveryFailed, Update, deliver, reason


def bearer(token_file: str, setting: str) -> dict[str, str]:
    """``Authorization: Bearer`` from ``token_file``, read now (the kubelet rotates projected
    tokens); no header when no file is configured.

    :raises DeliveryFailed: the file is configured but cannot be read or is empty.
    """
    if not token_file:
        return {}
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DeliveryFailed(
            f"cannot read the bearer token {setting}={token_file}: {exc.strerror or exc}"
        ) from None
    if not token:
        raise DeliveryFailed(f"the bearer token file {setting}={token_file} is empty")
    return {"Authorization": f"Bearer {token}"}


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
            token = bearer(config.broker_token_file, "KFP_TRAINER_BROKER_TOKEN_FILE")
            reply = self._http().post(
                config.broker_url,
                headers={**message.headers, **token},
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

    def publish(self, event: Any) -> None:
        """To the broker, which routes job.* events to their subscribers as the handler's."""
        self.send(event)

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
        token = bearer(self._config.handler_token_file, "KFP_TRAINER_HANDLER_TOKEN_FILE")
        try:
            reply = self._http().get(url, headers=token, timeout=self._config.http_timeout_s)
        except OSError as exc:
            raise DeliveryFailed(f"handler {url} unreachable: {exc}") from exc
        if reply.status_code == 404:
            return None
        if reply.status_code != 200:
            raise DeliveryFailed(
                f"handler {url} answered {reply.status_code}: {reason(reply.content)}"
            )
        return reply.json()
