"""Fixtures for remote mode: S3 as a moto server on loopback, credentials that only it accepts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.s3 import moto_server, set_credentials

FAKE_ACCESS_KEY = "AKIAREMOTETESTKEY0001"
FAKE_SECRET_KEY = "remote-test-secret-value-0001"  # asserted absent from IR, logs and events


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def s3_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's boto3 talks to the moto server with the fake credentials."""
    env = set_credentials(monkeypatch, FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3_ENDPOINT_URL=moto_url)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def bucket(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test (moto keeps state for the whole session)."""
    import boto3

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    client = boto3.client("s3", endpoint_url=s3_env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=name)
    return name
