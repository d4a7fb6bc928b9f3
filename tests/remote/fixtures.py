"""Shared remote-mode test setup: the tiny model and a dataset in S3, a stand-in with Secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from handler import contract
from handler.remote import s3
from handler.settings import RemoteSettings
from tests.kfp_standin import KfpStandin
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.support import REPO
from tests.support.jobs import job_request, make_tiny_model, write_dataset
from tests.support.loopback import wait_for
from tests.support.s3 import set_credentials
from tests.support.sink import Sink

PREFIX = "pt"
S3_SECRET = "kfp-trainer-s3"


def upload_tiny_model(model_dir: Path, remote: RemoteSettings) -> str:
    """Put the tiny model where the model store resolves it, via the real command."""
    env = {
        "S3_BUCKET": remote.s3_bucket,
        "S3_PREFIX": remote.s3_prefix,
        "S3_ENDPOINT_URL": remote.s3_endpoint_url,
    }
    import os

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "handler.remote.cli",
            "upload-model",
            "--model",
            "llama3.2-tiny",
            "--from",
            str(model_dir),
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(proc.stdout)["uri"]


def upload_dataset(remote: RemoteSettings, job_uuid: str, tmp: Path, rows: int = 8) -> str:
    local = write_dataset(tmp / f"{job_uuid}.jsonl", rows=rows)
    key = f"{PREFIX}/datasets/{job_uuid}/train.jsonl"
    client = boto3.client("s3", endpoint_url=remote.s3_endpoint_url)
    client.upload_file(str(local), remote.s3_bucket, key)
    return f"s3://{remote.s3_bucket}/{key}"


def remote_request(
    remote: RemoteSettings, job_uuid: str, tmp: Path, model_uri: str | None = None
) -> dict[str, Any]:
    data = job_request(job_uuid, upload_dataset(remote, job_uuid, tmp))
    if model_uri:
        data["model_artifact"] = {"uri": model_uri}
    return data


def standin_with_secrets(work_dir: Path, token: str) -> KfpStandin:
    """A stand-in whose cluster has the S3 Secret the pipeline's train task asks for."""
    standin = KfpStandin(token=token, work_dir=work_dir)
    standin.set_secret(
        S3_SECRET, {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY}
    )
    return standin


def list_keys(remote: RemoteSettings, prefix: str) -> list[str]:
    client = s3.s3_client(remote)
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=remote.s3_bucket, Prefix=prefix
    ):
        out.extend(obj["Key"] for obj in page.get("Contents", []))
    return out


def remote_setup(
    tmp: Path, moto_url: str, bucket: str, token: str, mp: pytest.MonkeyPatch
) -> tuple[RemoteSettings, Path, dict[str, str]]:
    """A bucket holding the tiny model, a token file and the remote handler's base env.

    This process's boto3 is pointed at moto with the fake credentials (through ``mp``).
    """
    creds = set_credentials(mp, FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3_ENDPOINT_URL=moto_url)
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=bucket)
    remote = RemoteSettings(s3_endpoint_url=moto_url, s3_bucket=bucket, s3_prefix=PREFIX)
    upload_tiny_model(make_tiny_model(tmp / "llama3.2-tiny"), remote)
    token_file = tmp / "sa-token"
    token_file.write_text(token)
    env = {
        **creds,
        "KFP_TRAINER_MODE": "remote",
        "KF_PIPELINES_SA_TOKEN_PATH": str(token_file),
        "S3_BUCKET": bucket,
        "S3_PREFIX": PREFIX,
        "KFP_TRAINER_CACHE_DIR": str(tmp / "model-cache"),
        "KFP_TRAINER_PROGRESS_INTERVAL_S": "0.5",
        # A notice nobody takes gives up soon (tests that need more say so).
        "KFP_TRAINER_NOTIFY_WINDOW_S": "30",
    }
    return remote, token_file, env


def runs_named(standin: KfpStandin, job_uuid: str) -> list[dict[str, Any]]:
    """The stand-in's runs whose display name is ``job_uuid`` (how the backend names them)."""
    flt = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": job_uuid}]}
    )
    return standin.state.list_runs({"filter": flt}).get("runs", [])


def wait_event(
    sink: Sink,
    job_uuid: str,
    short_type: str,
    timeout: float,
    every: float,
    diagnose: Callable[[], str],
) -> dict[str, Any]:
    """The first ``short_type`` event for ``job_uuid`` at ``sink``; on timeout fail with
    what the sink saw and ``diagnose()``."""

    def found() -> list[dict[str, Any]]:
        return [e for e in sink.of(job_uuid) if e["type"] == contract.PREFIX + short_type]

    try:
        return wait_for(found, timeout, f"{short_type} for {job_uuid}", every=every)[0]
    except AssertionError:
        raise AssertionError(
            f"no {short_type} for {job_uuid}; sink saw {sink.types(job_uuid)}{diagnose()}"
        ) from None
