"""Moving artifacts between URIs and local disk: local paths, file://, s3:// (boto3), and
https:// (datasets passed by reference; download only).

The same training task runs locally (artifacts are files already) and remotely (artifacts live
in S3 and the task fetches them itself, with the endpoint from ``S3_ENDPOINT_URL`` and
credentials from the standard ``AWS_*`` variables). Nothing here knows what an artifact means.

Every S3 failure leaves as one of two errors, decided in one place (:func:`failure`):
:class:`StorageUnavailable` when S3 did not answer or said "not now" (a caller may retry) and
:class:`StorageError` when it said no (missing bucket or object, access denied).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from pipelines.validation import local_path

HTTPS_TIMEOUT_S: Final = 30.0
# S3 error codes that mean "not now" rather than "no": the same call may succeed later.
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)


class StorageError(RuntimeError):
    """A fetch or publish failed for good (missing object or bucket, access denied, ...);
    the message names the URI."""


class StorageUnavailable(StorageError, ConnectionError):
    """The store did not answer, or answered "not now" (connection refused or reset, timeout,
    5xx, SlowDown, throttling): the same call may succeed later.

    Also a builtin ``ConnectionError``, so a caller that knows nothing of this module can tell a
    transient failure from a permanent ``StorageError``.
    """


def is_transient(exc: BaseException) -> bool:
    """True when a boto3/botocore failure (or what caused it) means "retry later".

    Connection and read failures, HTTP 5xx and 429, and S3's "slow down"-style codes are
    transient; every other S3 answer (NoSuchBucket, AccessDenied, 404, ...) is permanent.
    """
    from botocore import exceptions as boto

    seen: BaseException | None = exc
    for _ in range(5):  # the error, and what it wraps (s3transfer re-raises)
        if seen is None:
            return False
        if isinstance(seen, ConnectionError | TimeoutError):  # StorageUnavailable included
            return True
        if isinstance(seen, boto.ConnectionError | boto.HTTPClientError):
            return True
        if isinstance(seen, boto.ClientError):
            code = str(seen.response.get("Error", {}).get("Code", ""))
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if type(seen).__name__ == "RetriesExceededError":  # s3transfer gave up retrying
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe(exc: BaseException) -> str:
    """An S3 failure in a few words: ``Code: message`` (or the exception's type and text)."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code}: {error.get('Message') or exc}"
    return f"{type(exc).__name__}: {exc}"


def failure(what: str, exc: BaseException) -> StorageError:
    """The one translation of a boto3/botocore failure: transient or permanent, naming ``what``."""
    if isinstance(exc, StorageError):
        return exc
    if is_transient(exc):
        return StorageUnavailable(
            f"{what}: the store did not answer ({describe(exc)}); retry later"
        )
    return StorageError(f"{what}: {describe(exc)}")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_https(uri: str) -> bool:
    return uri.startswith("https://")


def _fetch_https(uri: str, dest: Path) -> Path:
    """Download one https:// object to ``dest/<basename>`` (a temporary name first).

    :raises StorageUnavailable: no connection, a timeout, 5xx or 429 (retry later).
    :raises StorageError: any other answer (404, 403, ...).
    """
    name = Path(urlparse(uri).path).name or "download"
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".fetch-{name}-", dir=dest)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(uri, timeout=HTTPS_TIMEOUT_S) as answer,
        ):
            shutil.copyfileobj(answer, out, 1 << 20)
        target = dest / name
        os.replace(tmp, target)
        return target
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise StorageUnavailable(
                f"cannot download {uri!r}: HTTP {exc.code}; retry later"
            ) from None
        raise StorageError(f"cannot download {uri!r}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StorageUnavailable(f"cannot download {uri!r}: {exc}; retry later") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/path`` -> ("bucket", "key/path")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with single slashes."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class S3Bounds:
    """How long one S3 call may take: botocore's defaults (60 s connect, 60 s read, 5 attempts)
    let a stalled PUT hold a training pod, and its GPU, for minutes."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = 3  # the first try included


S3_BOUNDS: Final = S3Bounds()


def client_config(bounds: S3Bounds = S3_BOUNDS) -> Any:
    """The botocore ``Config`` of every S3 client here and in the handler: bounded, path-style."""
    from botocore.config import Config

    return Config(
        connect_timeout=bounds.connect_timeout_s,
        read_timeout=bounds.read_timeout_s,
        retries={"total_max_attempts": bounds.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
    )


def s3_client(env: Mapping[str, str] | None = None, bounds: S3Bounds = S3_BOUNDS) -> Any:
    """A boto3 S3 client for ``S3_ENDPOINT_URL`` (empty: AWS); credentials from AWS_* env.

    Each call gives up after ``bounds`` (at most about (connect + read) x attempts).
    """
    import boto3

    env = os.environ if env is None else env
    endpoint = env.get("S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=client_config(bounds))


def _list(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """The objects under ``prefix``.

    :raises StorageUnavailable: S3 did not answer. :raises StorageError: it said no.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])
    except (BotoCoreError, ClientError) as exc:
        raise failure(f"cannot list s3://{bucket}/{prefix}", exc) from None


def _object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's metadata, or None when there is no such object.

    :raises StorageUnavailable: S3 did not answer. :raises StorageError: it said no.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise failure(f"cannot read s3://{bucket}/{key}", exc) from None
    except BotoCoreError as exc:
        raise failure(f"cannot read s3://{bucket}/{key}", exc) from None


def exists(uri: str, client: Any = None) -> str | None:
    """``"file"``, ``"dir"`` or None: what ``uri`` names, if anything."""
    path = local_path(uri)
    if path is not None:
        return "dir" if path.is_dir() else "file" if path.is_file() else None
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    if key and _object(client, bucket, key) is not None:
        return "file"
    for _ in _list(client, bucket, key.rstrip("/") + "/"):
        return "dir"
    return None


def fingerprint(uri: str, client: Any = None) -> str:
    """A digest that changes whenever the object(s) behind an s3:// URI change (ETags)."""
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    h = hashlib.sha256(uri.encode())
    head = _object(client, bucket, key) if key else None
    if head is not None:
        h.update(f"{head.get('ETag')}|{head.get('ContentLength')}".encode())
        return h.hexdigest()
    for obj in _list(client, bucket, key.rstrip("/") + "/"):
        h.update(f"{obj['Key']}|{obj.get('ETag')}|{obj.get('Size')}\n".encode())
    return h.hexdigest()


def fetch(uri: str, dest: Path, client: Any = None) -> Path:
    """Make ``uri`` available on local disk and return its path.

    Local paths and file:// URIs are returned in place (no copy). An s3:// object is downloaded
    to ``dest/<basename>``; an s3:// prefix (a "directory") to ``dest/<basename>/...``. Downloads
    land in a temporary name first, so ``dest`` never holds a partial artifact.

    :raises StorageUnavailable: S3 did not answer (transient).
    :raises StorageError: nothing exists at ``uri`` or the download fails for good.
    """
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise StorageError(f"{uri!r}: no such file or directory")
        return path
    if is_https(uri):
        return _fetch_https(uri, Path(dest))
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    name = key.rstrip("/").rsplit("/", 1)[-1] or bucket
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=dest))
    try:
        head = _object(client, bucket, key) if key else None
        if head is not None:
            client.download_file(bucket, key, str(tmp / name))
            staged = tmp / name
        else:
            prefix = key.rstrip("/") + "/" if key else ""
            staged = tmp / name
            staged.mkdir()
            count = 0
            for obj in _list(client, bucket, prefix):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                out = (staged / rel).resolve()
                if staged.resolve() not in out.parents:
                    raise StorageError(f"s3://{bucket}/{obj['Key']}: key escapes {uri!r}")
                out.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(out))
                count += 1
            if count == 0:
                raise StorageError(f"{uri!r}: no such object or prefix")
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staged, target)
        return target
    except StorageError:
        raise
    except Exception as exc:  # botocore errors carry the detail
        raise failure(f"cannot download {uri!r}", exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(local: Path, uri: str, client: Any = None) -> str:
    """Copy a local file or directory to ``uri`` (local path, file:// or s3://); return ``uri``.

    Publishing a path onto itself is a no-op, so local runs can write results in place.
    """
    local = Path(local)
    if not local.exists():
        raise StorageError(f"cannot publish {str(local)!r}: it does not exist")
    path = local_path(uri)
    if path is not None:
        if path.resolve() == local.resolve():
            return uri
        path.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, path, dirs_exist_ok=True)
        else:
            shutil.copy2(local, path)
        return uri
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    try:
        if local.is_dir():
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                client.upload_file(str(file), bucket, join(key, file.relative_to(local).as_posix()))
        else:
            client.upload_file(str(local), bucket, key)
    except Exception as exc:
        raise failure(f"cannot upload {str(local)!r} to {uri!r}", exc) from None
    return uri


def put_bytes(data: bytes, uri: str, client: Any = None) -> str:
    """Write ``data`` as one object (atomic on S3; tmp + rename locally)."""
    path = local_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return uri
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json")
    except Exception as exc:
        raise failure(f"cannot write {uri!r}", exc) from None
    return uri


def get_bytes(uri: str, client: Any = None) -> bytes:
    """Read one object or file."""
    path = local_path(uri)
    if path is not None:
        return path.read_bytes()
    bucket, key = parse_s3(uri)
    client = client or s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise failure(f"cannot read {uri!r}", exc) from None


def size_of(path: Path) -> int:
    """Bytes in a local file, or in every file under a local directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


__all__ = [
    "StorageError",
    "StorageUnavailable",
    "describe",
    "exists",
    "failure",
    "fetch",
    "fingerprint",
    "get_bytes",
    "is_https",
    "is_s3",
    "is_transient",
    "join",
    "parse_s3",
    "publish",
    "put_bytes",
    "s3_client",
    "size_of",
]
