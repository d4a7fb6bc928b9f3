"""Delivers emitted events from the store's outbox to the HTTP sink and in-process subscribers.

Every emitted event is written to the outbox in the transaction that changes the job, so
delivery is a separate, restartable loop: a worker leases due rows, POSTs each to the sink
(binary mode) and hands it to this process's subscribers, then marks it done. A failure keeps
the row and schedules a retry with exponential backoff (``delivery_backoff_s`` doubled per
attempt, capped at ``delivery_backoff_max_s``); there is no last attempt, so nothing is lost,
also across restarts. Consumers drop duplicates by event id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

from cloudevents.core.base import BaseCloudEvent

from handler import contract, logs, metrics
from handler.settings import HandlerSettings
from handler.sink import DeliveryError, SinkClient
from handler.store import JobStore, OutboxRow

log = logs.get("handler.outbox")

Subscriber = Callable[[BaseCloudEvent], None]
LEASE_S: Final = 60.0


class Outbox:
    """One worker's delivery loop over the shared outbox."""

    def __init__(self, settings: HandlerSettings, store: JobStore, owner: str) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._sink = SinkClient(settings.sink, settings.sink_token_path)

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th consecutive failure (1-based)."""
        base = self.settings.delivery_backoff_s * (2 ** max(attempts - 1, 0))
        return min(base, self.settings.delivery_backoff_max_s)

    def _deliver(self, row: OutboxRow) -> None:
        event = contract.event_from_dict(row.event)
        sink_done, local_done = row.sink_done, row.local_done
        errors: list[str] = []
        if not sink_done:
            if not self.settings.sink:
                sink_done = True
            else:
                try:
                    self._sink.post(event)
                    sink_done = True
                except DeliveryError as exc:
                    errors.append(str(exc))
        if not local_done:
            with self._lock:
                subscribers = list(self._subscribers)
            try:
                for callback in subscribers:
                    callback(event)
                local_done = True
            except Exception as exc:  # a subscriber's bug must not stop delivery to others
                log.exception("subscriber failed", extra={"event_id": row.event_id})
                errors.append(f"subscriber failed: {type(exc).__name__}: {exc}")
        if not errors:
            self.store.outbox_done(row.seq, sink=True, local=True)
            log.debug("event delivered", extra={"event_id": row.event_id, "type": row.type})
            return
        attempts = row.attempts + 1
        delay = self.backoff(attempts)
        metrics.DELIVERY_FAILURES.labels(metrics.event_label(row.type)).inc()
        level = "error" if attempts >= self.settings.delivery_attempts else "warning"
        getattr(log, level)(
            "event not delivered; will retry",
            extra={
                "event_id": row.event_id,
                "attempt": attempts,
                "retry_in_s": delay,
                "problem": "; ".join(errors),
            },
        )
        self.store.outbox_failed(
            row.seq,
            error="; ".join(errors),
            retry_at=time.time() + delay,
            sink=sink_done,
            local=local_done,
        )

    def run_once(self) -> int:
        """Deliver what is due now; return how many events were attempted."""
        rows = self.store.claim_outbox(self.owner, now=time.time(), lease_s=LEASE_S)
        for row in rows:
            self._deliver(row)
        return len(rows)

    def close(self) -> None:
        self._sink.close()
