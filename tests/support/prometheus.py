"""``GET /metrics`` read as Prometheus reads it: prometheus_client's own text parser."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(url: str) -> Samples:
    """Every sample of ``url + "/metrics"`` by (name, sorted labels)."""
    reply = requests.get(url + "/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(values: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when it is absent)."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)
