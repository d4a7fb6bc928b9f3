"""POSTing an event to the sink (K_SINK: the Broker): one binary-mode request, bounded.

Local mode's outbox retries what did not get through; remote mode's reconcile tick re-emits
on the next tick. Neither keeps a connection open between events longer than its session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from cloudevents.core.base import BaseCloudEvent

from handler import contract

if TYPE_CHECKING:
    import requests

SINK_TIMEOUT_S: Final = (3.05, 10.0)  # connect, read


class DeliveryError(RuntimeError):
    """The sink did not take the event (no connection, or a non-2xx answer)."""


class SinkClient:
    """Posts events to one URL; one ``requests.Session`` per client (not shared across forks)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: requests.Session | None = None

    def post(self, event: BaseCloudEvent) -> None:
        """:raises DeliveryError: naming the sink's answer or the connection problem."""
        import requests

        if self._session is None:
            self._session = requests.Session()
        message = contract.to_http(event)
        try:
            resp = self._session.post(
                self.url, headers=message.headers, data=message.body, timeout=SINK_TIMEOUT_S
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"sink unreachable: {type(exc).__name__}: {exc}") from exc
        if not 200 <= resp.status_code < 300:
            raise DeliveryError(f"sink answered {resp.status_code}: {resp.text[:200]}")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
