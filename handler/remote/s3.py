"""S3 in remote mode: where a job's results and the model artifacts live, and how they move.

Layout under ``s3://<S3_BUCKET>/<S3_PREFIX>/``:
``jobs/<job_uuid>/`` (the run's ``result_uri``: checkpoints plus ``result.json``, the manifest
the train task writes because KFP's REST API cannot show artifact metadata, and
``progress.json``, the train task's latest step) and
``models/<model>.tar`` (what ``kfp-trainer upload-model`` writes and the model store resolves).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from handler import metrics
from handler.backends.base import BackendUnavailable
from handler.settings import RemoteSettings

RESULT_FILE: Final = "result.json"
PROGRESS_FILE: Final = "progress.json"  # pipelines.task_events.PROGRESS_FILE
DIGEST_METADATA: Final = "sha256"  # x-amz-meta-sha256 on uploaded model archives
_CHUNK: Final = 1024 * 1024


class S3ConfigError(ValueError):
    """Remote mode's S3 settings are incomplete; the message names the variable."""


class ManifestError(ValueError):
    """The result manifest exists but is not a JSON object; the message names its URI."""


def s3_client(remote: RemoteSettings) -> Any:
    """A boto3 client for ``S3_ENDPOINT_URL`` (empty: AWS), bounded as the train task's is.

    Credentials come from boto3's chain (``AWS_*`` env from the mounted Secret, or a profile).
    """
    import boto3

    from pipelines.storage import client_config

    config = client_config()
    client = boto3.client("s3", endpoint_url=remote.s3_endpoint_url or None, config=config)
    client.meta.events.register("after-call.s3", _counted)
    client.meta.events.register("after-call-error.s3", _counted)
    return client


def _counted(model: Any = None, parsed: Any = None, exception: Any = None, **_: Any) -> None:
    """botocore's after-call hooks: one count per S3 call, by operation and outcome."""
    operation = getattr(model, "name", None) or "other"
    if exception is not None:
        result = metrics.outcome(exception)
    else:
        error = (parsed or {}).get("Error") or {}
        status = ((parsed or {}).get("ResponseMetadata") or {}).get("HTTPStatusCode")
        result = "ok" if not error and (status or 200) < 400 else str(error.get("Code") or status)
    metrics.S3_CALLS.labels(operation, result).inc()


def _base(remote: RemoteSettings) -> str:
    if not remote.s3_bucket:
        raise S3ConfigError("S3_BUCKET is not set; remote mode keeps results and models in S3")
    prefix = remote.s3_prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def job_prefix(remote: RemoteSettings, job_uuid: str) -> str:
    """``<prefix>/jobs/<job_uuid>/`` (a key prefix in ``S3_BUCKET``)."""
    return f"{_base(remote)}jobs/{job_uuid}/"


def result_uri(remote: RemoteSettings, job_uuid: str) -> str:
    """The run's ``result_uri`` parameter: ``s3://<bucket>/<prefix>/jobs/<job_uuid>/``."""
    return f"s3://{remote.s3_bucket}/{job_prefix(remote, job_uuid)}"


def model_store(remote: RemoteSettings) -> str:
    """``s3://<bucket>/<prefix>/models``: the model store remote mode resolves names in."""
    return f"s3://{remote.s3_bucket}/{_base(remote)}models"


def model_key(remote: RemoteSettings, model: str) -> str:
    return f"{_base(remote)}models/{model}.tar"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _unavailable(what: str, exc: Exception) -> BackendUnavailable:
    return BackendUnavailable(f"S3 unavailable while {what}: {type(exc).__name__}: {exc}")


def read_json(client: Any, remote: RemoteSettings, job_uuid: str, name: str) -> Stored | None:
    """``jobs/<job_uuid>/<name>`` as a JSON object, or None when it is not there (yet).

    :raises BackendUnavailable: S3 cannot be reached, refuses (bucket, access) or errs.
    :raises ManifestError: the object is there but is not a JSON object.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    key = job_prefix(remote, job_uuid) + name
    uri = f"s3://{remote.s3_bucket}/{key}"
    try:
        reply = client.get_object(Bucket=remote.s3_bucket, Key=key)
        body = reply["Body"].read()
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None
        if _code(exc) in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"):
            raise BackendUnavailable(f"cannot read {uri}: {_code(exc)}") from None
        raise _unavailable(f"reading {uri}", exc) from None
    except BotoCoreError as exc:
        raise _unavailable(f"reading {uri}", exc) from None
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ManifestError(f"{uri} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{uri} is not a JSON object")
    return Stored(value, reply.get("LastModified"))


def read_result(client: Any, remote: RemoteSettings, job_uuid: str) -> dict[str, Any] | None:
    """The job's result manifest (``result.json``), or None when the run has not written one."""
    stored = read_json(client, remote, job_uuid, RESULT_FILE)
    return stored.value if stored else None


@dataclass(frozen=True)
class Stored:
    """A JSON object read from S3 and when it was last written there."""

    value: dict[str, Any]
    modified: datetime | None


# ---- model upload ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    """What ``upload_model`` did."""

    uri: str
    sha256: str
    size: int
    skipped: bool  # the same digest was already there


def pack_model(src: Path, out: Path) -> str:
    """Write ``src``'s files into a plain tar at ``out``; return its sha256.

    The archive is reproducible (sorted names, zeroed times and owners), so the same directory
    always packs to the same digest and a repeated upload can be skipped.

    :raises ValueError: ``src`` is not a directory or holds no files.
    """
    if not src.is_dir():
        raise ValueError(f"model directory {str(src)!r} does not exist or is not a directory")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise ValueError(f"model directory {str(src)!r} holds no files")

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(src).as_posix(), filter=normalise)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remote_digest(client: Any, bucket: str, key: str) -> str | None:
    """The sha256 recorded on ``s3://bucket/key``, or None if the object is not there."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head.get("Metadata", {}).get(DIGEST_METADATA)


def upload_model(client: Any, remote: RemoteSettings, model: str, src: Path) -> Upload:
    """Pack ``src`` and put it at ``models/<model>.tar`` unless the same digest is there."""
    key = model_key(remote, model)
    uri = f"s3://{remote.s3_bucket}/{key}"
    fd, tmp_name = tempfile.mkstemp(prefix="kfp-trainer-model-", suffix=".tar")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        digest = pack_model(src, tmp)
        size = tmp.stat().st_size
        if remote_digest(client, remote.s3_bucket, key) == digest:
            return Upload(uri=uri, sha256=digest, size=size, skipped=True)
        client.upload_file(
            str(tmp),
            remote.s3_bucket,
            key,
            ExtraArgs={
                "Metadata": {DIGEST_METADATA: digest},
                "ContentType": "application/x-tar",
            },
        )
        return Upload(uri=uri, sha256=digest, size=size, skipped=False)
    finally:
        tmp.unlink(missing_ok=True)
