"""POSTing an event to the sink (K_SINK: the Broker): one binary-mode request, bounded.

Local mode's outbox retries what did not get through; remote mode's reconcile tick re-emits
on the next tick. Neither keeps a connection open between events longer than its session.
With Knative's OIDC on, the SinkBinding mounts a token for the Broker's audience in the pod
(``/oidc/token``, renewed in place); each POST carries it when the file is there.
"""

from __future__ import annotations

from pathlib import Path
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

    def __init__(self, url: str, token_path: str = "") -> None:
        self.url = url
        self.token_path = Path(token_path) if token_path else None
        self._session: requests.Session | None = None

    def _authorization(self) -> dict[str, str]:
        """The mounted token as a header, read now (it is renewed in place); none without it."""
        if self.token_path is None:
            return {}
        try:
            token = self.token_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise DeliveryError(
                f"cannot read the sink token {self.token_path}: {exc.strerror or exc}"
            ) from None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, event: BaseCloudEvent) -> None:
        """:raises DeliveryError: naming the sink's answer or the connection problem."""
        import requests

        if self._session is None:
            self._session = requests.Session()
        message = contract.to_http(event)
        headers = {**message.headers, **self._authorization()}
        try:
            resp = self._session.post(
                self.url, headers=headers, data=message.body, timeout=SINK_TIMEOUT_S
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"sink unreachable: {type(exc).__name__}: {exc}") from exc
        if not 200 <= resp.status_code < 300:
            raise DeliveryError(f"sink answered {resp.status_code}: {resp.text[:200]}")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
