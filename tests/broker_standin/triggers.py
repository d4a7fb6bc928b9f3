"""The Triggers of knative/triggers.yaml (and the Broker's default delivery), as values.

Read from the very manifests a cluster gets, so the tests route, retry and dead-letter exactly
as those say. Filters: ``filter.attributes`` (every attribute must match exactly) and
``filters`` with ``exact`` / ``any`` (the subset knative/ uses); anything else is refused, so a
manifest this stand-in cannot honour fails loudly instead of routing wrongly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO

KNATIVE_DIR = REPO / "knative"
_DURATION = re.compile(r"^PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")
# What Knative retries; every other failed answer goes to the dead-letter sink at once.
RETRIED_STATUSES = frozenset({404, 408, 409, 429})


def seconds(duration: str) -> float:
    """An ISO 8601 duration of the ``PT..H..M..S`` form, in seconds."""
    match = _DURATION.match(duration)
    if not match or not any(match.groups()):
        raise ValueError(f"backoffDelay {duration!r} is not a PT..H..M..S duration")
    hours, minutes, secs = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + secs


@dataclass(frozen=True)
class Delivery:
    """A ``delivery`` spec: ``retry`` retries with ``backoffPolicy``/``backoffDelay``, then the
    dead-letter sink (a Service name)."""

    retry: int = 0
    exponential: bool = True
    backoff_delay_s: float = 0.0
    dead_letter: str | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> Delivery | None:
        if not spec:
            return None
        policy = spec.get("backoffPolicy", "exponential")
        if policy not in ("exponential", "linear"):
            raise ValueError(f"backoffPolicy {policy!r} is neither exponential nor linear")
        dls = ((spec.get("deadLetterSink") or {}).get("ref") or {}).get("name")
        return cls(
            retry=int(spec.get("retry", 0)),
            exponential=policy == "exponential",
            backoff_delay_s=seconds(spec["backoffDelay"]) if "backoffDelay" in spec else 0.0,
            dead_letter=dls,
        )

    def delay_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1-based): ``backoffDelay * 2^(retry-1)``
        (exponential) or ``backoffDelay * (retry-1)`` (linear), as Knative's dispatcher waits:
        it computes ``backoffDelay * 2^attemptNum`` (or ``* attemptNum``) and go-retryablehttp
        counts attemptNum from 0."""
        if self.exponential:
            return self.backoff_delay_s * 2 ** (retry - 1)
        return self.backoff_delay_s * (retry - 1)

    def window_s(self) -> float:
        """How long after the first failed attempt the last retry goes out."""
        return sum(self.delay_s(n) for n in range(1, self.retry + 1))


@dataclass(frozen=True)
class Trigger:
    """One Trigger: what it lets through, where it delivers, how it retries."""

    name: str
    subscriber: str  # a Service name
    exact: tuple[dict[str, str], ...]  # any of these (each: all attributes equal)
    delivery: Delivery

    def matches(self, attributes: dict[str, Any]) -> bool:
        return any(all(attributes.get(k) == v for k, v in want.items()) for want in self.exact)


def _exact(spec: dict[str, Any], name: str) -> tuple[dict[str, str], ...]:
    if "filters" in spec:
        (expression,) = spec["filters"]
        branches = expression.get("any", [expression])
        out = []
        for branch in branches:
            if set(branch) != {"exact"}:
                raise ValueError(f"Trigger {name}: filter dialect {sorted(branch)} not supported")
            out.append(dict(branch["exact"]))
        return tuple(out)
    return (dict((spec.get("filter") or {}).get("attributes") or {}),)


def load(knative_dir: Path = KNATIVE_DIR) -> list[Trigger]:
    """The Triggers of ``knative_dir`` with the Broker's delivery as their default."""
    broker_delivery: Delivery | None = None
    specs: list[dict[str, Any]] = []
    for path in sorted(knative_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc:
                continue
            if doc.get("kind") == "Broker":
                broker_delivery = Delivery.from_spec(doc["spec"].get("delivery"))
            elif doc.get("kind") == "Trigger":
                specs.append(doc)
    triggers = []
    for doc in specs:
        spec = doc["spec"]
        name = doc["metadata"]["name"]
        delivery = Delivery.from_spec(spec.get("delivery")) or broker_delivery or Delivery()
        subscriber = spec["subscriber"]["ref"]["name"]
        triggers.append(Trigger(name, subscriber, _exact(spec, name), delivery))
    return triggers
