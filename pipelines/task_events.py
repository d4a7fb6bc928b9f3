"""What the train task tells the world while it runs: ``job.started``, throttled ``job.progress``.

Remote runs have no handler watching them (it keeps no state and may be scaled to zero), so the
task itself POSTs binary-mode CloudEvents to the Broker and keeps its latest progress in S3
(``progress.json`` beside result.json), where ``GET /jobs/<id>`` reads it. The handler passes
everything as one JSON pipeline parameter (:class:`TaskEventsConfig`): URL, ``source``, event
types and ids, so the contract stays defined in handler/contract.py alone; this module only
fills the job.status.json fields it knows (job_uuid, status, run_id, progress).

Delivery is best effort and never slows training: one background thread sends the newest
record, a newer step replaces an unsent older one (it says more: every record carries all the
epoch reports so far), a record bringing a new epoch report goes out at once rather than after
the interval, and every POST and PUT is bounded. Consumers dedupe by ``source`` + ``id``, so a
repeated event is harmless. Every event carries the job's trace (the distributed-tracing
extension's ``traceparent``/``tracestate``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pipelines.logs import event
from pipelines.sa_token import AudienceToken, TokenUnavailable

log = logging.getLogger(__name__)

POST_TIMEOUT_S: Final = (2.0, 5.0)  # connect, read
ATTEMPTS: Final = 2
PROGRESS_FILE: Final = "progress.json"


@dataclass(frozen=True)
class TaskEventsConfig:
    """Where and as what the train task announces itself (the ``task_events`` parameter)."""

    url: str
    source: str
    started_type: str
    started_id: str
    progress_type: str
    progress_id_prefix: str  # the id of step N is prefix + str(N)
    interval_s: float = 2.0
    progress_uri: str = ""  # s3:// (or local) URI of progress.json; "" = none

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> TaskEventsConfig | None:
        """The parameter's value as a config; None when it is empty (local runs).

        :raises ValueError: naming what is wrong with a non-empty value.
        """
        if not raw:
            return None
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"task_events parameter is not a TaskEventsConfig: {exc}") from None


class TaskEvents:
    """The train task's announcer: ``started()``, ``progress(record)``, then ``close()``."""

    def __init__(
        self,
        config: TaskEventsConfig,
        job_uuid: str,
        run_id: str,
        *,
        token: AudienceToken | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """:param token: the bearer token every POST carries (None: no Authorization header).
        :param trace: the W3C trace context every event carries (the train span's)."""
        self.config = config
        self._token = token
        self.job_uuid = job_uuid
        self.run_id = run_id
        self.trace = {k: v for k, v in (trace or {}).items() if v}
        self._cond = threading.Condition()
        self._started = False  # job.started waiting to be sent
        self._latest: dict[str, Any] | None = None  # newest progress not yet sent
        self._reports_taken = 0  # epoch reports in the newest record taken for sending
        self._news = False  # _latest brings an epoch report not yet taken: send it now
        self._last_sent = 0.0
        self._closing = False
        self._session: Any = None
        self._thread = threading.Thread(target=self._run, name="task-events", daemon=True)
        self._thread.start()

    def started(self) -> None:
        with self._cond:
            self._started = True
            self._cond.notify()

    def progress(self, record: dict[str, Any]) -> None:
        """Offer a progress record (step, total_steps, epoch, loss, lr, grad_norm, epochs); sent
        at most once per ``interval_s``, the newest one winning, except that one bringing a new
        epoch report is sent without waiting."""
        with self._cond:
            self._latest = dict(record)
            if len(record.get("epochs") or ()) > self._reports_taken:
                self._news = True
            self._cond.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is pending (the last step included), then stop; bounded by ``timeout_s``."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the sender thread ----------------------------------------------------------------------

    def _next(self) -> tuple[str, dict[str, Any] | None] | None:
        """Wait for something due: ("started", None), ("progress", record), or None to stop."""
        with self._cond:
            while True:
                if self._started:
                    self._started = False
                    return "started", None
                wait = self._last_sent + self.config.interval_s - time.monotonic()
                if self._latest is not None and (wait <= 0 or self._closing or self._news):
                    record, self._latest, self._news = self._latest, None, False
                    self._reports_taken = len(record.get("epochs") or ())
                    return "progress", record
                if self._closing:
                    return None
                self._cond.wait(wait if self._latest is not None else None)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            kind, record = item
            if kind == "started":
                self._post(self.config.started_type, self.config.started_id, None)
                continue
            assert record is not None
            self._last_sent = time.monotonic()
            step_id = f"{self.config.progress_id_prefix}{record.get('step')}"
            self._post(self.config.progress_type, step_id, record)
            self._put_progress(record)

    def _post(self, event_type: str, event_id: str, progress: dict[str, Any] | None) -> None:
        import requests

        if not self.config.url:
            return
        if self._session is None:
            self._session = requests.Session()
        data: dict[str, Any] = {"job_uuid": self.job_uuid, "status": "in_progress"}
        if self.run_id:
            data["run_id"] = self.run_id
        if progress is not None:
            data["progress"] = progress
        headers = {
            "ce-specversion": "1.0",
            "ce-type": event_type,
            "ce-source": self.config.source,
            "ce-id": event_id,
            "ce-subject": self.job_uuid,
            "content-type": "application/json",
            **{f"ce-{k}": v for k, v in self.trace.items()},
        }
        for attempt in range(1, ATTEMPTS + 1):
            try:
                auth = self._token.header() if self._token is not None else {}
                resp = self._session.post(
                    self.config.url,
                    data=json.dumps(data),
                    headers={**headers, **auth},
                    timeout=POST_TIMEOUT_S,
                )
                if resp.status_code < 300:
                    return
                problem = f"HTTP {resp.status_code}"
            except (requests.RequestException, TokenUnavailable) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            event(
                log,
                "task event not delivered",
                level=logging.WARNING,
                event_id=event_id,
                attempt=attempt,
                problem=problem,
            )

    def _put_progress(self, record: dict[str, Any]) -> None:
        from pipelines import storage

        if not self.config.progress_uri:
            return
        try:
            storage.put_bytes(json.dumps(record).encode(), self.config.progress_uri)
        except storage.StorageError as exc:
            event(log, "progress not stored", level=logging.WARNING, problem=str(exc))


__all__ = ["PROGRESS_FILE", "TaskEvents", "TaskEventsConfig"]
