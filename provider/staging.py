"""Stage a dataset as JSONL for the train task: every row, in pages that grow, bounded memory.

The training run never talks to llama-stack, so the rows travel by URI. Two readers feed one
loop (:func:`stage`):

- :class:`DatasetioPages`: ``iterrows`` through llama-stack's datasetio, whatever its provider.
  It follows ``has_more`` to the end (no truncation).
- :class:`FilePages`: a local CSV, JSONL or Parquet file read here, with the trainer's row
  semantics (pipelines.data: every cell as its text).

Pages start small, so a bad first row is found at once, and grow by ``factor`` up to a
ceiling, so a large dataset costs few calls (localfs re-reads the whole source for each one).
Each page is checked row by row (the trainer's rules: the message names dataset, row and
column), encoded and written to a :class:`Sink` (a local file here, S3 multipart in
:mod:`provider.s3stage`) before the next is read: memory grows with the page, not the dataset.
The blocking parts run in worker threads and ``await`` between pages, so the event loop keeps
serving and a cancelled task stops at the next page.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final, Protocol

from pipelines.data import DatasetError, check_row, iter_rows

REQUIRED_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "instruct": ("chat_completion_input", "expected_answer"),
    "dialog": ("dialog",),
}
# A file read here costs the same per row whatever the page, so its pages stay small.
FILE_PAGE_MAX: Final = 10_000


@dataclass(frozen=True)
class PageSizes:
    """Page sizes that start at ``first`` and grow by ``factor`` up to ``ceiling``.

    ``first`` = -1 asks for every row in one page (``iterrows(limit=-1)``, what llama-stack's
    own torchtune provider does): memory then grows with the dataset.

    >>> from itertools import islice
    >>> list(islice(PageSizes(100, 1000, 4), 5))
    [100, 400, 1000, 1000, 1000]
    """

    first: int = 100
    ceiling: int = 100_000
    factor: int = 4

    def __iter__(self) -> Iterator[int]:
        if self.first < 0:
            while True:
                yield -1
        size = max(1, self.first)
        while True:
            yield size
            size = min(max(size * self.factor, size + 1), max(self.ceiling, self.first))


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


# One encoder for every row: json.dumps with options builds a new encoder on each call.
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False, default=_plain).encode


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSON line, keys as datasetio gave them."""
    return (_ENCODE(row) + "\n").encode("utf-8")


def _as_text(value: Any) -> Any:
    """Undo pandas' number inference on a text column: a csv answer ``7`` is the text "7"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def datasetio_row(row: Any, data_format: str, *, dataset: str, index: int) -> dict[str, Any]:
    """A row as datasetio gave it, ready to stage: checked as the trainer checks it.

    Empty cells (pandas' NaN) become null and numbers in the format's columns become text
    again (pandas read a csv answer ``7`` as a number); then every rule of the data format
    applies (:func:`pipelines.data.check_row`).

    :raises DatasetError: naming the dataset id, the row (from 0) and the column.
    """
    if not isinstance(row, dict):
        raise DatasetError(f"dataset {dataset!r} row {index}: a row must be an object")
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    for column in REQUIRED_COLUMNS.get(data_format, ()):
        if column in row:
            row[column] = _as_text(row[column])
    check_row(row, data_format, dataset=dataset, index=index)
    return row


class PageSource(Protocol):
    """Where the rows of one dataset come from, one page at a time."""

    async def page(self, start: int, limit: int) -> tuple[list[Any], bool]:
        """Up to ``limit`` rows from row ``start`` on (-1: all), and whether more follow."""
        ...

    def ready(self, row: Any, data_format: str, index: int) -> dict[str, Any]:
        """The row checked and as it is staged (see :func:`datasetio_row`)."""
        ...


class DatasetioPages:
    """Rows through llama-stack's datasetio ``iterrows``.

    :param source: what messages call the dataset's source (its URI, or "inline rows").
    """

    def __init__(self, datasetio: Any, dataset_id: str, source: str) -> None:
        self.datasetio = datasetio
        self.dataset_id = dataset_id
        self.source = source

    async def page(self, start: int, limit: int) -> tuple[list[Any], bool]:
        try:
            page = await self.datasetio.iterrows(
                dataset_id=self.dataset_id, start_index=start, limit=limit
            )
        except Exception as exc:  # whatever the datasetio provider raises: say what and where
            raise DatasetError(
                f"dataset {self.dataset_id!r} ({self.source}): datasetio could not read rows "
                f"from row {start} on: {type(exc).__name__}: {exc}"
            ) from None
        data = list(page.data)
        if page.has_more and not data:
            raise DatasetError(
                f"dataset {self.dataset_id!r}: datasetio reported more rows after {start} "
                "but returned an empty page"
            )
        return data, bool(page.has_more)

    def ready(self, row: Any, data_format: str, index: int) -> dict[str, Any]:
        return datasetio_row(row, data_format, dataset=self.dataset_id, index=index)


class FilePages:
    """Rows of a local CSV, JSONL or Parquet file, read here (pipelines.data semantics)."""

    def __init__(self, path: Path, file_format: str, dataset_id: str) -> None:
        self.dataset_id = dataset_id
        self._rows: Iterator[dict[str, Any]] = iter_rows(path, file_format, dataset=dataset_id)

    def _read(self, limit: int) -> tuple[list[Any], bool]:
        if limit < 0:
            return list(self._rows), False
        data = list(islice(self._rows, limit))
        return data, len(data) == limit

    async def page(self, start: int, limit: int) -> tuple[list[Any], bool]:
        return await asyncio.to_thread(self._read, limit)

    def ready(self, row: Any, data_format: str, index: int) -> dict[str, Any]:
        check_row(row, data_format, dataset=self.dataset_id, index=index)
        return row


Progress = Callable[[int, int], Awaitable[object]]  # (rows staged, bytes staged)


def _encode_page(source: PageSource, data: list[Any], data_format: str, start: int) -> bytes:
    chunk = bytearray()
    for offset, row in enumerate(data):
        chunk += encode_row(source.ready(row, data_format, start + offset))
    return bytes(chunk)


async def stage(
    source: PageSource,
    dataset_id: str,
    sink: Sink,
    *,
    data_format: str,
    pages: PageSizes,
    on_page: Progress | None = None,
) -> StagedDataset:
    """Copy every row of ``source`` into ``sink`` as JSONL, page by page (growing).

    :param on_page: called after each page is written, with the rows and bytes so far.
    :raises DatasetError: no rows, a bad row (dataset, row and column named), an unreadable
        source (dataset and source named), or paging that stalls.
    :return: the staged dataset's URI, row count, sha256 and size.
    """
    digest = hashlib.sha256()
    rows = size = 0
    try:
        for limit in pages:
            data, more = await source.page(rows, limit)
            chunk = await asyncio.to_thread(_encode_page, source, data, data_format, rows)
            count = len(data)
            del data  # the page's rows are in ``chunk`` now: hold one copy, not two
            if chunk:
                digest.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(sink.write, chunk)
            rows += count
            if on_page is not None:
                await on_page(rows, size)
            if not more:
                break
        if rows == 0:
            raise DatasetError(f"dataset {dataset_id!r} has 0 rows; nothing to train on")
        uri = await asyncio.to_thread(sink.commit)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(sink.abort))
        raise
    return StagedDataset(uri=uri, rows=rows, sha256=digest.hexdigest(), size=size)


async def stage_dataset(
    datasetio: Any,
    dataset_id: str,
    sink: Sink,
    *,
    data_format: str,
    page_size: int,
    page_max: int = 100_000,
    source: str = "",
    on_page: Progress | None = None,
) -> StagedDataset:
    """Every row of a registered dataset through datasetio into ``sink`` (see :func:`stage`)."""
    return await stage(
        DatasetioPages(datasetio, dataset_id, source or "through datasetio"),
        dataset_id,
        sink,
        data_format=data_format,
        pages=PageSizes(page_size, page_max),
        on_page=on_page,
    )


async def stage_file(
    path: Path,
    file_format: str,
    dataset_id: str,
    sink: Sink,
    *,
    data_format: str,
    page_size: int,
    on_page: Progress | None = None,
) -> StagedDataset:
    """Every row of a local file into ``sink`` (see :func:`stage`)."""
    return await stage(
        FilePages(path, file_format, dataset_id),
        dataset_id,
        sink,
        data_format=data_format,
        pages=PageSizes(page_size, FILE_PAGE_MAX),
        on_page=on_page,
    )
