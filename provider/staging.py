"""Stage a registered dataset as JSONL: every row, read page by page through datasetio.

The training run never talks to llama-stack, so the rows travel by URI. This module reads the
whole dataset (no truncation: it follows ``has_more`` until the end), checks each row has the
columns its ``data_format`` needs (as text: pandas reads a csv answer ``7`` as a number), and
streams the JSON lines into a :class:`Sink` (a local file
here, S3 multipart in :mod:`provider.s3stage`) while counting rows and hashing the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

REQUIRED_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "instruct": ("chat_completion_input", "expected_answer"),
    "dialog": ("dialog",),
}


class DatasetError(ValueError):
    """The dataset cannot be trained on as given; the message names the dataset and the fix."""


@dataclass(frozen=True)
class StagedDataset:
    """Where the staged JSONL lies and what it holds (the contract's dataset_ref)."""

    uri: str
    rows: int
    sha256: str
    size: int

    def ref(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": "jsonl", "rows": self.rows, "sha256": self.sha256}


class Sink(Protocol):
    """Where staged bytes go. Blocking methods; the stager calls them off the event loop."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> str:
        """Make the written bytes visible; return their URI."""
        ...

    def abort(self) -> None:
        """Drop whatever was written; safe to call twice."""
        ...


class FileSink:
    """A local JSONL file, written under a temporary name and renamed on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._fh = None

    def write(self, data: bytes) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 (closed in commit/abort)
        self._fh.write(data)

    def commit(self) -> str:
        if self._fh is None:
            self.write(b"")
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)
        return str(self.path)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """JSON-safe row values: NaN (pandas' empty csv cell) becomes null, numpy scalars unwrap."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value)


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSON line, keys as datasetio gave them."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return (json.dumps(clean, ensure_ascii=False, default=_plain) + "\n").encode("utf-8")


def _as_text(value: Any) -> Any:
    """Undo pandas' number inference on a text column: a csv answer ``7`` is the text "7"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_row(dataset_id: str, index: int, row: Any, data_format: str) -> dict[str, Any]:
    """The row ready to stage: its format's columns present and text.

    :raises DatasetError: naming the row and column when a needed column is absent or empty.
    """
    if not isinstance(row, dict):
        raise DatasetError(f"dataset {dataset_id!r} row {index} is not an object")
    row = dict(row)
    for column in REQUIRED_COLUMNS.get(data_format, ()):
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
            raise DatasetError(
                f"dataset {dataset_id!r} row {index} has no {column!r}; data_format "
                f"{data_format!r} needs columns {', '.join(REQUIRED_COLUMNS[data_format])}"
            )
        row[column] = _as_text(value)
    return row


async def stage_dataset(
    datasetio: Any,
    dataset_id: str,
    sink: Sink,
    *,
    data_format: str,
    page_size: int,
) -> StagedDataset:
    """Copy every row of ``dataset_id`` into ``sink`` as JSONL.

    :param datasetio: llama-stack's DatasetIO (the router), read with ``iterrows`` pages.
    :raises DatasetError: the dataset has no rows, a row lacks a needed column, or paging stalls.
    :return: the staged dataset's URI, row count, sha256 and size.
    """
    digest = hashlib.sha256()
    rows = size = 0
    try:
        while True:
            page = await datasetio.iterrows(
                dataset_id=dataset_id, start_index=rows, limit=page_size
            )
            data = list(page.data)
            chunk = bytearray()
            for offset, row in enumerate(data):
                chunk += encode_row(check_row(dataset_id, rows + offset, row, data_format))
            if chunk:
                digest.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(sink.write, bytes(chunk))
            rows += len(data)
            if not page.has_more:
                break
            if not data:
                raise DatasetError(
                    f"dataset {dataset_id!r}: datasetio reported more rows after {rows} "
                    "but returned an empty page"
                )
        if rows == 0:
            raise DatasetError(f"dataset {dataset_id!r} has 0 rows; nothing to train on")
        uri = await asyncio.to_thread(sink.commit)
    except BaseException:
        await asyncio.to_thread(sink.abort)
        raise
    return StagedDataset(uri=uri, rows=rows, sha256=digest.hexdigest(), size=size)
