"""How the provider's events reach the handler, and how the handler's view comes back.

Two transports answer one interface, chosen by one lookup on ``config.mode``:
local (:mod:`provider.local`) hands the HTTP message to the in-process handler's ``handle`` (the
code path the Flask view uses) and subscribes to its events; remote (:mod:`provider.remote`)
POSTs to the Knative broker and asks the handler's ``GET /jobs/<job_uuid>``.
Replies are read here once, whichever transport carried them.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from provider.config import KfpTrainerConfig

# Knative's delivery rules: these answers are retried, every other 4xx is final.
RETRYABLE_STATUS: Final = frozenset({404, 408, 409, 429})
MAX_RETRY_AFTER_S: Final = 30.0

TRANSPORTS: Final[dict[str, str]] = {
    "local": "provider.local:LocalTransport",
    "remote": "provider.remote:RemoteTransport",
}

Update = dict[str, Any]  # job.status.json shape


class RequestRejected(ValueError):
    """The handler refused the event for good (a 4xx); the message is the handler's reason."""


class DeliveryFailed(TimeoutError):
    """The event could not be delivered after every attempt; nothing was accepted.

    A ``TimeoutError`` because llama-stack answers those with 504 and the message (an upstream
    that did not take the event), where any other exception becomes an anonymous 500.
    """


@dataclass(frozen=True)
class Answer:
    """One HTTP answer to a delivered event, whatever carried it."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Send events to the handler; learn what the handler knows about a job."""

    #: True when reads should ask :meth:`job` for non-terminal jobs (no event subscription).
    polls: bool

    def start(self, on_update: Callable[[Update], object]) -> None: ...

    def stop(self) -> None: ...

    def send(self, event: Any) -> list[Update]:
        """Deliver one CloudEvent; return the status updates its reply carried.

        :raises RequestRejected: the handler said no (the message says why).
        :raises DeliveryFailed: not delivered after the configured attempts.
        """
        ...

    def publish(self, event: Any) -> None:
        """Emit a job.* event the provider itself decided (a job that ended before it reached
        the handler), to where the handler's own events go.

        :raises DeliveryFailed: not delivered after the configured attempts.
        """
        ...

    def job(self, job_uuid: str) -> Update | None:
        """The handler's job.status.json view of a job, or None when it does not know it."""
        ...

    def problems(self) -> list[str]:
        """Why the handler cannot take work now ([] when it can); backs the provider's health."""
        ...


def make_transport(config: KfpTrainerConfig) -> Transport:
    """The transport for ``config.mode`` (one lookup; no mode checks elsewhere)."""
    module_name, _, class_name = TRANSPORTS[config.mode].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(config)


def reason(body: bytes) -> str:
    """The human part of an error answer: the handler's ``problems``/``message`` (or a
    ``detail``/``error``), else the text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text[:2000] or "(empty body)"
    if isinstance(value, dict):
        for key in ("problems", "message", "detail", "error"):
            found = value.get(key)
            if found:
                return "; ".join(map(str, found)) if isinstance(found, list) else str(found)
    return text[:2000]


def reply_updates(answer: Answer) -> list[Update]:
    """Status updates carried by a 200 reply event (binary or structured); [] when none."""
    from handler import contract

    if answer.status != 200 or not answer.body:
        return []
    headers = {k.lower(): v for k, v in answer.headers.items()}
    if "ce-type" not in headers and "cloudevents" not in headers.get("content-type", ""):
        return []
    try:
        event = contract.from_http(dict(headers), answer.body)
    except contract.ContractError:
        return []
    if event.get_type() not in contract.EMITTED_TYPES:
        return []
    return [contract.event_data(event)]


def retry_delay(answer: Answer | None, attempt: int, backoff_s: float) -> float:
    """Exponential backoff, or the server's Retry-After when it sent one (capped)."""
    if answer is not None:
        raw = {k.lower(): v for k, v in answer.headers.items()}.get("retry-after", "")
        if raw.isdigit():
            return min(float(raw), MAX_RETRY_AFTER_S)
    return min(backoff_s * (2**attempt), MAX_RETRY_AFTER_S)


def deliver(
    send_once: Callable[[], Answer],
    *,
    attempts: int,
    backoff_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Update]:
    """Call ``send_once`` until accepted, retrying transient failures (Knative's rules).

    ``send_once`` raises ``OSError`` (or a requests ``ConnectionError``, which is one) for
    transport failures; those are retried like 5xx answers.
    """
    last = "no attempt made"
    for attempt in range(attempts):
        answer: Answer | None = None
        try:
            answer = send_once()
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= answer.status < 300:
                return reply_updates(answer)
            message = reason(answer.body)
            if answer.status not in RETRYABLE_STATUS and answer.status < 500:
                raise RequestRejected(message)
            last = f"HTTP {answer.status}: {message}"
        if attempt + 1 < attempts:
            sleep(retry_delay(answer, attempt, backoff_s))
    raise DeliveryFailed(f"could not deliver {what} after {attempts} attempts; last: {last}")
