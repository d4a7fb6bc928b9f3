"""Fixtures for the provider tests: S3 as a moto server on loopback (real HTTP, boto3)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.support.s3 import moto_server, set_credentials


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port>, with throwaway credentials in the env."""
    set_credentials(monkeypatch, "testing", "testing")
    with moto_server() as url:
        # moto keeps its state per process: start every test from an empty S3.
        requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
        yield url
