"""handler.remote.s3 and `upload-model` against S3 served by moto over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import boto3
import pytest

from handler.backends.base import BackendUnavailable
from handler.remote import s3
from handler.settings import RemoteSettings
from tests.support import REPO


def remote_for(s3_env: dict[str, str], bucket: str, prefix: str = "team/pt") -> RemoteSettings:
    return RemoteSettings(
        s3_endpoint_url=s3_env["S3_ENDPOINT_URL"], s3_bucket=bucket, s3_prefix=prefix
    )


def test_layout():
    remote = RemoteSettings(s3_bucket="b", s3_prefix="/p/q/")
    assert s3.result_uri(remote, "job-1") == "s3://b/p/q/jobs/job-1/"
    assert s3.model_key(remote, "llama3.2-tiny") == "p/q/models/llama3.2-tiny.tar"
    assert s3.model_store(remote) == "s3://b/p/q/models"
    assert s3.result_uri(RemoteSettings(s3_bucket="b", s3_prefix=""), "j") == "s3://b/jobs/j/"
    with pytest.raises(s3.S3ConfigError, match="S3_BUCKET is not set"):
        s3.result_uri(RemoteSettings(), "j")


def test_read_result_missing_present_and_broken(s3_env, bucket):
    remote = remote_for(s3_env, bucket)
    client = s3.s3_client(remote)
    assert s3.read_result(client, remote, "job-1") is None
    key = s3.job_prefix(remote, "job-1") + "result.json"
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"status": "completed"}).encode())
    assert s3.read_result(client, remote, "job-1") == {"status": "completed"}
    client.put_object(Bucket=bucket, Key=key, Body=b"not json")
    with pytest.raises(s3.ManifestError, match=f"s3://{bucket}/{key} is not valid JSON"):
        s3.read_result(client, remote, "job-1")


def test_read_result_when_s3_is_down_is_unavailable(s3_env):
    remote = RemoteSettings(s3_endpoint_url="http://127.0.0.1:9", s3_bucket="b")
    with pytest.raises(BackendUnavailable, match="S3 unavailable while reading s3://b/"):
        s3.read_result(s3.s3_client(remote), remote, "job-1")


def test_pack_is_reproducible(tmp_path):
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    first = s3.pack_model(model, tmp_path / "a.tar")
    os.utime(model / "config.json", (1, 1))
    assert s3.pack_model(model, tmp_path / "b.tar") == first
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert sorted(tar.getnames()) == ["config.json", "sub/w.bin"]
    with pytest.raises(ValueError, match="holds no files"):
        (tmp_path / "empty").mkdir()
        s3.pack_model(tmp_path / "empty", tmp_path / "c.tar")


def upload_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handler.remote.cli", "upload-model", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_upload_model_cli_uploads_then_skips_then_replaces(s3_env, bucket, tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text('{"dim": 8}')
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    env = {**s3_env, "S3_BUCKET": bucket, "S3_PREFIX": "pt"}

    first = upload_cli(env, "--model", "llama3.2-tiny", "--from", str(model))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["uploaded"] is True
    assert summary["uri"] == f"s3://{bucket}/pt/models/llama3.2-tiny.tar"
    client = boto3.client("s3", endpoint_url=s3_env["S3_ENDPOINT_URL"])
    head = client.head_object(Bucket=bucket, Key="pt/models/llama3.2-tiny.tar")
    assert head["Metadata"]["sha256"] == summary["sha256"]
    mtime = head["LastModified"]

    again = upload_cli(env, "--model", "llama3.2-tiny", "--from", str(model))
    assert json.loads(again.stdout) == {**summary, "uploaded": False}
    assert (
        client.head_object(Bucket=bucket, Key="pt/models/llama3.2-tiny.tar")["LastModified"]
        == mtime
    )

    (model / "config.json").write_text('{"dim": 16}')
    changed = json.loads(upload_cli(env, "--model", "llama3.2-tiny", "--from", str(model)).stdout)
    assert changed["uploaded"] is True and changed["sha256"] != summary["sha256"]

    # What the model store resolves and stages is exactly the directory that was uploaded.
    from pipelines.staging import resolve_model_uri, stage_model
    from pipelines.storage import fetch

    uri = resolve_model_uri("llama3.2-tiny", f"s3://{bucket}/pt/models")
    assert uri == changed["uri"]
    staged = stage_model(fetch(uri, tmp_path / "dl"), tmp_path / "cache")
    assert (staged / "config.json").read_text() == '{"dim": 16}'
    assert (staged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_upload_model_cli_errors_name_the_problem(s3_env, bucket, tmp_path):
    env = {**s3_env, "S3_BUCKET": bucket}
    unknown = upload_cli(env, "--model", "gpt-9", "--from", str(tmp_path))
    assert unknown.returncode == 1
    assert "unknown model 'gpt-9'" in unknown.stderr and "Llama3.2-1B-Instruct" in unknown.stderr
    missing = upload_cli(env, "--model", "llama3.2-tiny", "--from", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "tiny-model" in missing.stderr
    model = tmp_path / "m"
    model.mkdir()
    (model / "a").write_text("x")
    no_bucket = upload_cli(
        {**s3_env, "S3_BUCKET": ""}, "--model", "llama3.2-tiny", "--from", str(model)
    )
    assert no_bucket.returncode == 1 and "S3_BUCKET is not set" in no_bucket.stderr
    wrong = upload_cli(
        {**env, "S3_BUCKET": "no-such-bucket"}, "--model", "llama3.2-tiny", "--from", str(model)
    )
    assert wrong.returncode == 1
    assert "S3 refused the upload to bucket 'no-such-bucket'" in wrong.stderr
    assert "NoSuchBucket" in wrong.stderr and "Traceback" not in wrong.stderr
