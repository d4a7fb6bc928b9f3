"""Dataset staging: every row through llama-stack's real localfs datasetio in pages that grow,
or straight from a local file; written page by page, progress after each page."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
from pathlib import Path

import pytest
from llama_stack.apis.datasets import Dataset
from llama_stack.providers.inline.datasetio.localfs.config import LocalFSDatasetIOConfig
from llama_stack.providers.inline.datasetio.localfs.datasetio import LocalFSDatasetIOImpl
from llama_stack.providers.utils.kvstore.config import SqliteKVStoreConfig

from provider.staging import (
    DatasetError,
    FileSink,
    Pacing,
    PageSizes,
    stage_dataset,
    stage_file,
)


class CountingDatasetIO:
    """The real localfs datasetio, recording each page request the stager makes."""

    def __init__(self, inner: LocalFSDatasetIOImpl) -> None:
        self.inner = inner
        self.calls: list[tuple[int | None, int | None]] = []

    async def iterrows(self, dataset_id, start_index=None, limit=None):
        self.calls.append((start_index, limit))
        return await self.inner.iterrows(dataset_id, start_index=start_index, limit=limit)


async def _datasetio(tmp_path: Path, datasets: dict[str, dict]) -> CountingDatasetIO:
    impl = LocalFSDatasetIOImpl(
        LocalFSDatasetIOConfig(kvstore=SqliteKVStoreConfig(db_path=str(tmp_path / "ds.db")))
    )
    await impl.initialize()
    for dataset_id, source in datasets.items():
        await impl.register_dataset(
            Dataset(
                identifier=dataset_id,
                provider_resource_id=dataset_id,
                provider_id="localfs",
                purpose="post-training/messages",
                source=source,
            )
        )
    return CountingDatasetIO(impl)


def _rows(n: int) -> list[dict]:
    return [
        {
            "chat_completion_input": json.dumps([{"role": "user", "content": f"question {i}"}]),
            "expected_answer": f"answer {i} ü",
        }
        for i in range(n)
    ]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_every_row_of_a_csv_is_staged_in_pages_that_grow(tmp_path) -> None:
    rows = _rows(230)
    source = {"type": "uri", "uri": str(_write_csv(tmp_path / "train.csv", rows))}
    progress: list[tuple[int, int]] = []

    async def on_page(staged_rows: int, size: int) -> None:
        progress.append((staged_rows, size))

    async def go():
        io = await _datasetio(tmp_path, {"train": source})
        out = tmp_path / "stage" / "train.jsonl"
        staged = await stage_dataset(
            io,
            "train",
            FileSink(out),
            data_format="instruct",
            page_size=5,
            page_max=80,
            on_page=on_page,
            clock=lambda: 0.0,  # calls that cost nothing: the planned sizes alone
        )
        return io, out, staged

    io, out, staged = asyncio.run(go())
    assert staged.rows == 230
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    assert staged.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert staged.size == out.stat().st_size
    assert staged.uri == str(out)
    # 5, then x4 up to the ceiling: the first bad row would be found in the first 5
    assert io.calls == [(0, 5), (5, 20), (25, 80), (105, 80), (185, 80)]
    assert [p[0] for p in progress] == [5, 25, 105, 185, 230]
    assert progress[-1][1] == staged.size
    assert staged.ref() == {
        "uri": str(out),
        "format": "jsonl",
        "rows": 230,
        "sha256": staged.sha256,
    }
    assert not list(out.parent.glob("*.part"))


def test_page_sizes() -> None:
    from itertools import islice

    assert list(islice(PageSizes(100, 100_000), 7)) == [100, 400, 1600, 6400, 25600, 100_000] + [
        100_000
    ]
    assert list(islice(PageSizes(-1, 10), 2)) == [-1, -1]  # everything in one iterrows call
    assert list(islice(PageSizes(500, 10), 2)) == [500, 500]  # the first is never cut


class ScriptedClock:
    """A clock that only moves when a datasetio call is made: ``cost(limit)`` seconds."""

    def __init__(self, cost) -> None:
        self.now = 0.0
        self.cost = cost

    def __call__(self) -> float:
        return self.now


class CostlyDatasetIO(CountingDatasetIO):
    """Each iterrows call advances the clock by what the cost model says it costs."""

    def __init__(self, inner: CountingDatasetIO, clock: ScriptedClock) -> None:
        super().__init__(inner.inner)
        self.clock = clock

    async def iterrows(self, dataset_id, start_index=None, limit=None):
        self.clock.now += self.clock.cost(limit)
        return await super().iterrows(dataset_id, start_index=start_index, limit=limit)


def _staged_calls(tmp_path, rows: int, cost) -> tuple[list, int]:
    source = {"type": "uri", "uri": str(_write_csv(tmp_path / "c.csv", _rows(rows)))}
    clock = ScriptedClock(cost)

    async def go():
        io = CostlyDatasetIO(await _datasetio(tmp_path, {"c": source}), clock)
        staged = await stage_dataset(
            io,
            "c",
            FileSink(tmp_path / "c.jsonl"),
            data_format="instruct",
            page_size=5,
            page_max=80,
            clock=clock,
        )
        return io.calls, staged.rows

    return asyncio.run(go())


def test_pages_outgrow_the_ceiling_when_a_call_costs_the_same_whatever_its_rows(tmp_path) -> None:
    """localfs's way: every call re-reads the source. Three calls, not one per 80 rows."""
    calls, rows = _staged_calls(tmp_path, 2000, cost=lambda limit: 1.0)
    assert rows == 2000
    # our own cost per row is taken as at least 1 us: 4 * 1 s / 1 us rows after two pages
    assert calls == [(0, 5), (5, 20), (25, 4_000_000)]


def test_pages_keep_the_ceiling_when_a_call_costs_its_rows(tmp_path) -> None:
    """A provider that pages for real: memory stays bounded by the ceiling."""
    calls, rows = _staged_calls(tmp_path, 300, cost=lambda limit: 0.001 * limit)
    assert rows == 300
    assert calls == [(0, 5), (5, 20), (25, 80), (105, 80), (185, 80), (265, 80)]


def test_pacing_fits_a_fixed_and_a_per_row_cost() -> None:
    pacing = Pacing(PageSizes(100, 1000))
    assert pacing.next() == 100
    pacing.observe(100, 0.05 + 100e-5, copy_s=100e-5)  # 50 ms a call, 10 us a row, ours 10 us
    assert pacing.next() == 400
    pacing.observe(400, 0.05 + 400e-5, copy_s=400e-5)
    fixed, per_row = pacing.fitted()
    assert (round(fixed, 6), round(per_row, 9)) == (0.05, 1e-5)
    assert pacing.next() == 10_000  # 4 * 50 ms / (10 + 10 us): past the ceiling of 1000
    assert Pacing(PageSizes(-1, 10)).next() == -1


def test_one_page_of_everything_is_llama_stacks_own_way(tmp_path) -> None:
    source = {"type": "uri", "uri": str(_write_csv(tmp_path / "t.csv", _rows(30)))}

    async def go():
        io = await _datasetio(tmp_path, {"t": source})
        staged = await stage_dataset(
            io, "t", FileSink(tmp_path / "t.jsonl"), data_format="instruct", page_size=-1
        )
        return io, staged

    io, staged = asyncio.run(go())
    assert (io.calls, staged.rows) == ([(0, -1)], 30)


def test_inline_rows_with_a_missing_cell_name_the_row_and_column(tmp_path) -> None:
    rows = _rows(4)
    rows[2]["expected_answer"] = None

    async def go():
        io = await _datasetio(tmp_path, {"inline": {"type": "rows", "rows": rows}})
        out = tmp_path / "x.jsonl"
        with pytest.raises(
            DatasetError,
            match=r"^dataset 'inline' row 2: 'expected_answer' is empty; data_format 'instruct'",
        ):
            await stage_dataset(io, "inline", FileSink(out), data_format="instruct", page_size=3)
        return out

    out = asyncio.run(go())
    assert not out.exists()
    assert not list(tmp_path.glob("*.part"))


def test_a_source_datasetio_cannot_read_names_the_dataset_and_the_source(tmp_path) -> None:
    """localfs raises whatever pandas raises (here: no such file); the job's error says where."""
    missing = tmp_path / "gone.csv"
    source = {"type": "uri", "uri": str(missing)}

    async def go():
        io = await _datasetio(tmp_path, {"gone": source})
        with pytest.raises(DatasetError) as info:
            await stage_dataset(
                io,
                "gone",
                FileSink(tmp_path / "g.jsonl"),
                data_format="instruct",
                page_size=3,
                source=repr(str(missing)),
            )
        return str(info.value)

    message = asyncio.run(go())
    assert message.startswith(
        f"dataset 'gone' ('{missing}'): datasetio could not read rows from row 0 on: "
        "FileNotFoundError:"
    )


def test_a_local_file_is_read_here_every_cell_as_text(tmp_path) -> None:
    rows = _rows(25_000)
    rows[3]["expected_answer"] = "007"
    rows[4]["expected_answer"] = "NA"
    path = _write_csv(tmp_path / "t.csv", rows)
    progress: list[int] = []

    async def on_page(staged_rows: int, size: int) -> None:
        progress.append(staged_rows)

    out = tmp_path / "t.jsonl"
    staged = asyncio.run(
        stage_file(
            path, "csv", "t", FileSink(out), data_format="instruct", page_size=100, on_page=on_page
        )
    )
    assert staged.rows == 25_000
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    assert progress == [100, 500, 2100, 8500, 18500, 25000]  # growing, at most 10,000 a page


def test_a_bad_row_in_a_local_file_is_named_by_dataset_row_and_column(tmp_path) -> None:
    rows = _rows(3000)
    rows[2500]["chat_completion_input"] = "plain text"
    path = _write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(DatasetError, match=r"^dataset 'big' row 2500: chat_completion_input is"):
        asyncio.run(
            stage_file(
                path,
                "csv",
                "big",
                FileSink(tmp_path / "o.jsonl"),
                data_format="instruct",
                page_size=100,
            )
        )
    assert not (tmp_path / "o.jsonl").exists()


def test_dialog_format_needs_a_dialog_column(tmp_path) -> None:
    async def go():
        io = await _datasetio(tmp_path, {"d": {"type": "rows", "rows": _rows(2)}})
        with pytest.raises(DatasetError, match=r"row 0: missing field 'dialog'"):
            await stage_dataset(
                io, "d", FileSink(tmp_path / "d.jsonl"), data_format="dialog", page_size=10
            )

    asyncio.run(go())


def test_an_empty_dataset_is_refused(tmp_path) -> None:
    header_only = tmp_path / "empty.csv"
    header_only.write_text("chat_completion_input,expected_answer\n")

    async def go():
        io = await _datasetio(tmp_path, {"e": {"type": "uri", "uri": str(header_only)}})
        with pytest.raises(DatasetError, match="'e' has 0 rows"):
            await stage_dataset(
                io, "e", FileSink(tmp_path / "e.jsonl"), data_format="instruct", page_size=10
            )

    asyncio.run(go())
    assert not (tmp_path / "e.jsonl").exists()


def test_extra_columns_and_numbers_pass_through(tmp_path) -> None:
    rows = [dict(r, weight=i, note=None) for i, r in enumerate(_rows(3))]

    async def go():
        io = await _datasetio(tmp_path, {"r": {"type": "rows", "rows": rows}})
        out = tmp_path / "r.jsonl"
        await stage_dataset(io, "r", FileSink(out), data_format="instruct", page_size=2)
        return out

    out = asyncio.run(go())
    staged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["weight"] for r in staged] == [0, 1, 2]
    assert all(r["note"] is None for r in staged)


def test_numeric_answers_read_by_pandas_stay_text(tmp_path) -> None:
    path = tmp_path / "numbers.csv"
    path.write_text(
        'chat_completion_input,expected_answer\n"[{""role"": ""user"", ""content"": ""1+1""}]",2\n'
        '"[{""role"": ""user"", ""content"": ""half""}]",0.5\n'
    )

    async def go():
        io = await _datasetio(tmp_path, {"n": {"type": "uri", "uri": str(path)}})
        out = tmp_path / "n.jsonl"
        await stage_dataset(io, "n", FileSink(out), data_format="instruct", page_size=10)
        return out

    out = asyncio.run(go())
    staged = [json.loads(line) for line in out.read_text().splitlines()]
    # pandas read the column as floats (2.0, 0.5); the staged text is what the csv said
    assert [r["expected_answer"] for r in staged] == ["2", "0.5"]
    assert json.loads(staged[0]["chat_completion_input"]) == [{"role": "user", "content": "1+1"}]
