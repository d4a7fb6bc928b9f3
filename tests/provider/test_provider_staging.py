"""Dataset staging reads every row through llama-stack's real localfs datasetio, page by page."""

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

from provider.staging import DatasetError, FileSink, stage_dataset


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


def test_every_row_of_a_csv_is_staged_across_pages(tmp_path) -> None:
    rows = _rows(23)
    source = {"type": "uri", "uri": str(_write_csv(tmp_path / "train.csv", rows))}

    async def go():
        io = await _datasetio(tmp_path, {"train": source})
        out = tmp_path / "stage" / "train.jsonl"
        staged = await stage_dataset(
            io, "train", FileSink(out), data_format="instruct", page_size=5
        )
        return io, out, staged

    io, out, staged = asyncio.run(go())
    assert staged.rows == 23
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    assert staged.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert staged.size == out.stat().st_size
    assert staged.uri == str(out)
    assert io.calls == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 5)]
    assert staged.ref() == {"uri": str(out), "format": "jsonl", "rows": 23, "sha256": staged.sha256}
    assert not list(out.parent.glob("*.part"))


def test_inline_rows_with_a_missing_cell_name_the_row_and_column(tmp_path) -> None:
    rows = _rows(4)
    rows[2]["expected_answer"] = None

    async def go():
        io = await _datasetio(tmp_path, {"inline": {"type": "rows", "rows": rows}})
        out = tmp_path / "x.jsonl"
        with pytest.raises(DatasetError, match=r"row 2 has no 'expected_answer'"):
            await stage_dataset(io, "inline", FileSink(out), data_format="instruct", page_size=3)
        return out

    out = asyncio.run(go())
    assert not out.exists()
    assert not list(tmp_path.glob("*.part"))


def test_dialog_format_needs_a_dialog_column(tmp_path) -> None:
    async def go():
        io = await _datasetio(tmp_path, {"d": {"type": "rows", "rows": _rows(2)}})
        with pytest.raises(DatasetError, match="needs columns dialog"):
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
