"""Shared remote-mode test setup: the tiny model and a dataset in S3, a stand-in with Secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3

from handler.remote import s3
from handler.settings import RemoteSettings
from tests.kfp_standin import KfpStandin
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.support import REPO
from tests.support.jobs import job_request, write_dataset

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
