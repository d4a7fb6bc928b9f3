"""Remote mode's dataset sink: a streaming S3 multipart upload (boto3), never the whole file.

Rows arrive page by page; bytes are buffered only up to one part, so a dataset larger than the
provider's memory still stages. Keys follow ``<prefix>/datasets/<job_uuid>/<name>.jsonl``, the
layout the remote pipeline reads from.

S3 failures are told apart as pipelines.storage tells them (one classification): S3 not
answering or saying "not now" is :class:`S3Unavailable` (fine-tune again later), anything else
is :class:`S3Refused` (the provider's S3 settings need fixing). Staging runs after the call
returned, so either ends the job ``failed`` with that message; nothing was submitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provider import logs
from provider.config import S3Config

log = logs.get("provider.s3stage")


class S3Unavailable(TimeoutError):
    """S3 did not answer (or said "not now") while staging a dataset; nothing was submitted."""


class S3Refused(ValueError):
    """S3 refused the dataset upload for good (no such bucket, access denied, ...)."""


def staging_error(uri: str, exc: BaseException) -> S3Unavailable | S3Refused:
    """The provider's error for a failed upload to ``uri``, transient or not."""
    from pipelines.storage import describe, is_transient

    if is_transient(exc):
        return S3Unavailable(
            f"S3 did not answer while staging the dataset to {uri} ({describe(exc)}); "
            "nothing was submitted; fine-tune again once S3 answers"
        )
    return S3Refused(
        f"S3 refused the dataset upload to {uri} ({describe(exc)}); check the provider's s3 "
        "settings (bucket, endpoint, credentials)"
    )


def s3_client(config: S3Config) -> Any:
    """A boto3 S3 client for the configured endpoint; credentials come from boto3's chain."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url or None,
        region_name=config.region or None,
        # Path-style works with MinIO, Ceph and ODF as well as AWS.
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}
        ),
    )


def dataset_key(config: S3Config, job_uuid: str, name: str) -> str:
    """``<prefix>/datasets/<job_uuid>/<name>.jsonl`` (prefix may be empty)."""
    prefix = config.prefix.strip("/")
    key = f"datasets/{job_uuid}/{name}.jsonl"
    return f"{prefix}/{key}" if prefix else key


class S3MultipartSink:
    """Streams written bytes to ``s3://bucket/key`` as multipart parts of ``part_size`` bytes.

    The upload starts with the first write; ``commit`` sends the remainder and completes it,
    ``abort`` cancels it so no orphaned parts keep costing storage.
    """

    def __init__(self, client: Any, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self.bucket = bucket
        self.key = key
        self._part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def parts_uploaded(self) -> int:
        return len(self._parts)

    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """One S3 request; its failure becomes S3Unavailable or S3Refused naming the URI."""
        try:
            return fn(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as exc:
            raise staging_error(self.uri, exc) from None

    def _start(self) -> None:
        if self._upload_id is None:
            reply = self._call(
                self._client.create_multipart_upload, ContentType="application/x-ndjson"
            )
            self._upload_id = reply["UploadId"]

    def _send(self, data: bytes) -> None:
        self._start()
        number = len(self._parts) + 1
        reply = self._call(
            self._client.upload_part, UploadId=self._upload_id, PartNumber=number, Body=data
        )
        self._parts.append({"ETag": reply["ETag"], "PartNumber": number})

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            part = bytes(self._buffer[: self._part_size])
            del self._buffer[: self._part_size]
            self._send(part)

    def commit(self) -> str:
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        self._call(
            self._client.complete_multipart_upload,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None
        return self.uri

    def abort(self) -> None:
        """Cancel the upload; best effort, so the error that caused the abort is what surfaces
        (parts S3 keeps after a failed abort are what a bucket's lifecycle rule for incomplete
        multipart uploads removes)."""
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._call(self._client.abort_multipart_upload, UploadId=upload_id)
            except (S3Unavailable, S3Refused) as exc:
                log.warning(
                    "could not abort the dataset upload",
                    extra={"uri": self.uri, "upload_id": upload_id, "problem": str(exc)},
                )
