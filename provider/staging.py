"""Stage a dataset as JSONL for the train task: every row, in pages that grow, bounded memory.

The training run never talks to llama-stack, so the rows travel by URI. Two readers feed one
loop (:func:`stage`):

- :class:`DatasetioPages`: ``iterrows`` through llama-stack's datasetio, whatever its provider.
  It follows ``has_more`` to the end (no truncation).
- :class:`FilePages`: a local CSV, JSONL or Parquet file read here, with the trainer's row
  semantics (pipelines.data: every cell as its text).

Pages start small, so a bad first row is found at once, and grow by ``factor`` up to a
ceiling (:class:`PageSizes`). A datasetio call may cost more than its rows: localfs re-reads
and converts the whole source on every ``iterrows``, so with any fixed ceiling the time grows
with the square of the size. :class:`Pacing` measures each call and fits its cost as a fixed
part plus a part per row; while the fixed part dominates, the next page grows past the
ceiling until the rows outweigh it. A provider that pages for real keeps the ceiling (memory
bounded by the page); one that re-reads everything gets a few large pages (linear time, and
memory no more than the provider itself already takes for one call).

Each row is checked (the trainer's rules: the message names dataset, row and column), encoded
and appended to a buffer that goes to a :class:`Sink` (a local file here, S3 multipart in
:mod:`provider.s3stage`) every :data:`WRITE_BYTES`: what is held is the page datasetio
returned (none for a file read here, whose rows are encoded as they are read) and at most one
buffer. The blocking parts run in worker threads and ``await`` between pages, so the event
loop keeps serving and a cancelled task stops at the next page.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
# Encoded rows reach the sink in pieces of about this size (the one buffer staging holds).
WRITE_BYTES: Final = 256 * 1024
# A page grows past the ceiling until its rows cost this many times a call's fixed part.
ROWS_OVER_FIXED: Final = 4
# The least a row is taken to cost (s), so a clock too coarse to see it cannot divide by 0.
MIN_ROW_S: Final = 1e-6


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


class Pacing:
    """The size of each next page: :class:`PageSizes`, or more while a call's fixed cost rules.

    After each page, :meth:`observe` gets the rows it returned, the seconds the source took
    to return them and the seconds spent checking and writing them. From the last two pages
    of unlike size (one at least twice the other) the source's cost is fitted as
    ``fixed + per_row * rows``; when ``fixed`` outweighs what the planned page's rows cost
    (the source's per row plus ours), the page grows to ``ROWS_OVER_FIXED * fixed / row
    cost`` rows, so a call's fixed part is at most a fifth of its time and the number of calls
    stops growing with the dataset.

    >>> pacing = Pacing(PageSizes(100, 1000))
    >>> pacing.next(), pacing.observe(100, 2.0, 0.001), pacing.next()
    (100, None, 400)
    >>> pacing.observe(400, 2.0, 0.004), pacing.next()  # 2 s whatever the rows: re-reads all
    (None, 800000)
    """

    def __init__(self, sizes: PageSizes) -> None:
        self._planned = iter(sizes)
        self._seen: list[tuple[int, float]] = []  # (rows returned, source seconds)
        self._row_s = MIN_ROW_S  # our own cost per row (check, encode, write)

    def observe(self, rows: int, source_s: float, copy_s: float) -> None:
        """Record one page: its rows, the source's seconds, and ours."""
        seen = (rows, max(0.0, source_s))
        if self._seen and _alike(self._seen[-1][0], rows):  # same size: no slope to see
            self._seen[-1] = seen
        else:
            self._seen = [*self._seen[-1:], seen]
        if rows:
            self._row_s = max(MIN_ROW_S, copy_s / rows)

    def fitted(self) -> tuple[float, float] | None:
        """The source's (fixed seconds, seconds per row) from the last two pages, if known."""
        if len(self._seen) < 2:
            return None
        (r1, t1), (r2, t2) = self._seen
        per_row = max(0.0, (t2 - t1) / (r2 - r1)) if r2 != r1 else 0.0
        return max(0.0, t2 - per_row * r2), per_row

    def next(self) -> int:
        planned = next(self._planned)
        fit = self.fitted()
        if planned < 0 or fit is None:
            return planned
        fixed, per_row = fit
        row_s = per_row + self._row_s
        if fixed <= row_s * planned:
            return planned
        return max(planned, math.ceil(ROWS_OVER_FIXED * fixed / row_s))


def _alike(a: int, b: int) -> bool:
    """Page sizes too close to tell a call's fixed cost from its rows' (under 2x apart)."""
    return max(a, b) < 2 * min(a, b)


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


class _Out:
    """The staged bytes: hashed, counted and sent to the sink about every ``WRITE_BYTES``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self._buffer = bytearray()

    def add(self, line: bytes) -> None:
        self._buffer += line
        if len(self._buffer) >= WRITE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            buffer, self._buffer = self._buffer, bytearray()
            self.digest.update(buffer)
            self.size += len(buffer)
            self.sink.write(buffer)


Ready = Callable[[Any, str, int], dict[str, Any]]


def _copy(rows: Iterable[Any], ready: Ready, data_format: str, start: int, out: _Out) -> int:
    """Check, encode and write ``rows`` (row ``start`` on); return how many there were."""
    count = 0
    for count, row in enumerate(rows, 1):
        out.add(encode_row(ready(row, data_format, start + count - 1)))
    out.flush()
    return count


@dataclass(frozen=True)
class Copied:
    """One page written: its rows, whether more follow, the source's seconds and ours."""

    rows: int
    more: bool
    source_s: float
    copy_s: float


class PageSource(Protocol):
    """Where the rows of one dataset come from, one page at a time."""

    async def copy(
        self, start: int, limit: int, data_format: str, out: _Out, clock: Callable[[], float]
    ) -> Copied:
        """Write up to ``limit`` rows from row ``start`` on (-1: all) to ``out``, checked."""
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
        """Up to ``limit`` rows from row ``start`` on (-1: all), and whether more follow."""
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

    async def copy(
        self, start: int, limit: int, data_format: str, out: _Out, clock: Callable[[], float]
    ) -> Copied:
        began = clock()
        data, more = await self.page(start, limit)
        fetched = clock()
        count = await asyncio.to_thread(_copy, data, self.ready, data_format, start, out)
        return Copied(count, more, fetched - began, clock() - fetched)


class FilePages:
    """Rows of a local CSV, JSONL or Parquet file, read here (pipelines.data semantics).

    Rows are encoded as they are read, so a page holds no rows, only the write buffer.
    """

    def __init__(self, path: Path, file_format: str, dataset_id: str) -> None:
        self.dataset_id = dataset_id
        self._rows: Iterator[dict[str, Any]] = iter_rows(path, file_format, dataset=dataset_id)

    def ready(self, row: Any, data_format: str, index: int) -> dict[str, Any]:
        check_row(row, data_format, dataset=self.dataset_id, index=index)
        return row

    async def copy(
        self, start: int, limit: int, data_format: str, out: _Out, clock: Callable[[], float]
    ) -> Copied:
        began = clock()
        rows = self._rows if limit < 0 else islice(self._rows, limit)
        count = await asyncio.to_thread(_copy, rows, self.ready, data_format, start, out)
        return Copied(count, limit >= 0 and count == limit, 0.0, clock() - began)


Progress = Callable[[int, int], Awaitable[object]]  # (rows staged, bytes staged)


async def stage(
    source: PageSource,
    dataset_id: str,
    sink: Sink,
    *,
    data_format: str,
    pages: PageSizes,
    on_page: Progress | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> StagedDataset:
    """Copy every row of ``source`` into ``sink`` as JSONL, page by page (growing, :class:`Pacing`).

    :param on_page: called after each page is written, with the rows and bytes so far.
    :param clock: what page costs are measured with.
    :raises DatasetError: no rows, a bad row (dataset, row and column named), an unreadable
        source (dataset and source named), or paging that stalls.
    :return: the staged dataset's URI, row count, sha256 and size.
    """
    out = _Out(sink)
    pacing = Pacing(pages)
    rows = 0
    try:
        while True:
            copied = await source.copy(rows, pacing.next(), data_format, out, clock)
            pacing.observe(copied.rows, copied.source_s, copied.copy_s)
            rows += copied.rows
            if on_page is not None:
                await on_page(rows, out.size)
            if not copied.more:
                break
        if rows == 0:
            raise DatasetError(f"dataset {dataset_id!r} has 0 rows; nothing to train on")
        uri = await asyncio.to_thread(sink.commit)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(sink.abort))
        raise
    return StagedDataset(uri=uri, rows=rows, sha256=out.digest.hexdigest(), size=out.size)


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
    clock: Callable[[], float] = time.perf_counter,
) -> StagedDataset:
    """Every row of a registered dataset through datasetio into ``sink`` (see :func:`stage`)."""
    return await stage(
        DatasetioPages(datasetio, dataset_id, source or "through datasetio"),
        dataset_id,
        sink,
        data_format=data_format,
        pages=PageSizes(page_size, page_max),
        on_page=on_page,
        clock=clock,
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
