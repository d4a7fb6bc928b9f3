"""Remote mode's dataset sink: a streaming S3 multipart upload (boto3), never the whole file.

Rows arrive page by page; bytes are buffered only up to one part, so a dataset larger than the
provider's memory still stages. Keys follow ``<prefix>/datasets/<job_uuid>/<name>.jsonl``, the
layout the remote pipeline reads from.
"""

from __future__ import annotations

from typing import Any

from provider.config import S3Config


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

    def _start(self) -> None:
        if self._upload_id is None:
            reply = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType="application/x-ndjson"
            )
            self._upload_id = reply["UploadId"]

    def _send(self, data: bytes) -> None:
        self._start()
        number = len(self._parts) + 1
        reply = self._client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
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
        self._client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None
        return self.uri

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=upload_id
            )
