"""Fixtures for the pipeline tests: one tiny model per session, its archives, an S3 stand-in."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipelines.pipeline_helpers import make_tar
from tests.support.s3 import moto_server, set_credentials


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight llama3.2-tiny checkpoint (Meta layout, bf16), written once."""
    from pipelines.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama3.2-tiny")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in the Hugging Face layout (bf16, one model.safetensors)."""
    from pipelines.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "hf", layout="huggingface")


@pytest.fixture(scope="session")
def tiny_hf_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hugging Face layout in shards with model.safetensors.index.json, as 3B/8B ship."""
    from pipelines.tiny import write_tiny_model

    return write_tiny_model(
        tmp_path_factory.mktemp("models") / "hf-sharded",
        layout="huggingface",
        max_shard_size="100KB",
    )


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 copies of the tiny model in both layouts: logits compare tightly in fp32."""
    from pipelines.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("models-fp32")
    return {
        layout: write_tiny_model(root / layout, layout=layout, dtype="fp32")
        for layout in ("meta", "huggingface")
    }


@pytest.fixture(scope="session")
def model_archives(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as .tar, .tar.gz, and a plain tar misnamed .tar.gz."""
    root = tmp_path_factory.mktemp("archives")
    return {
        "tar": make_tar(tiny_model, root / "tiny.tar", gzip=False),
        "tar.gz": make_tar(tiny_model, root / "tiny.tar.gz", gzip=True),
        "misnamed": make_tar(tiny_model, root / "plain-tar-named.tar.gz", gzip=False),
    }


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server (server mode, real HTTP) on a free loopback port."""
    with moto_server() as url:
        yield url


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3 (here and in task subprocesses) at the moto server."""
    return set_credentials(monkeypatch, "testing", "testing", S3_ENDPOINT_URL=moto_endpoint)


@pytest.fixture
def bucket(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test."""
    from pipelines.storage import s3_client

    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    s3_client().create_bucket(Bucket=name)
    return name
