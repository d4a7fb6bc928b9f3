"""pipelines.data: dataset files read by reference (CSV, JSONL, Parquet), every cell as text."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from pipelines.data import (
    DatasetError,
    check_row,
    iter_rows,
    normalize,
    read_dataset,
    source_format,
)


def _question(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


ROWS = [
    {"chat_completion_input": _question("Bond's number?"), "expected_answer": "007"},
    {"chat_completion_input": _question("Price?"), "expected_answer": "3.50"},
    {"chat_completion_input": _question("A thousand?"), "expected_answer": "1e3"},
    {"chat_completion_input": _question("Not applicable?"), "expected_answer": "NA"},
    {"chat_completion_input": _question("Anything ü?"), "expected_answer": "null"},
]


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_csv_cells_stay_the_text_they_were(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", ROWS)
    assert list(iter_rows(path, "csv", dataset="t")) == ROWS


def test_pandas_as_datasetio_uses_it_changes_those_cells(tmp_path: Path) -> None:
    """What localfs datasetio (pandas.read_csv) makes of the same file: why we read it here."""
    import pandas

    answers = pandas.read_csv(_csv(tmp_path / "t.csv", ROWS))["expected_answer"].tolist()
    assert answers[:3] != ["007", "3.50", "1e3"]
    assert pandas.isna(answers[3])  # "NA" is missing to pandas


def test_jsonl_numbers_keep_their_text(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"chat_completion_input": "[]", "expected_answer": 3.50, "n": 7}\n\n'
        '{"chat_completion_input": "[]", "expected_answer": true}\n'
    )
    rows = list(iter_rows(path, "jsonl", dataset="t"))
    assert rows == [
        {"chat_completion_input": "[]", "expected_answer": "3.50", "n": "7"},
        {"chat_completion_input": "[]", "expected_answer": True},
    ]


def test_parquet_typed_cells_become_text_nested_messages_stay(tmp_path: Path) -> None:
    path = _parquet(
        tmp_path / "t.parquet",
        [
            {"dialog": [{"role": "user", "content": "a"}], "n": 7, "x": 0.5, "s": "007"},
            {"dialog": [{"role": "user", "content": "b"}], "n": None, "x": 1.0, "s": "NA"},
        ],
    )
    rows = list(iter_rows(path, "parquet", dataset="t"))
    assert rows[0] == {
        "dialog": [{"role": "user", "content": "a"}],
        "n": "7",
        "x": "0.5",
        "s": "007",
    }
    assert rows[1]["n"] is None and rows[1]["s"] == "NA"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_format_gives_the_same_conversations(tmp_path: Path, fmt: str) -> None:
    write = {"csv": _csv, "jsonl": _jsonl, "parquet": _parquet}[fmt]
    src = write(tmp_path / f"t.{fmt}", ROWS)
    read = normalize(src, fmt, "instruct", tmp_path / "out.jsonl", dataset="t")
    reference = normalize(
        _jsonl(tmp_path / "ref.jsonl", ROWS), "jsonl", "instruct", tmp_path / "r.jsonl", dataset="t"
    )
    assert read.rows == len(ROWS)
    assert read.rows_sha256 == reference.rows_sha256
    assert read.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert read.format == fmt and read.dataset == "t"
    turns = read_dataset(tmp_path / "out.jsonl", "instruct")  # what the recipe reads
    assert [t[1].content for t in turns] == ["007", "3.50", "1e3", "NA", "null"]


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        (
            {"chat_completion_input": _question("q"), "expected_answer": True},
            "instruct",
            "dataset 'x' row 1: expected_answer must be a string (text), got true",
        ),
        (
            {"chat_completion_input": "What is 2+2?", "expected_answer": "4"},
            "instruct",
            "dataset 'x' row 1: chat_completion_input is not valid JSON: Expecting value: line 1 "
            'column 1 (char 0) (it must hold a JSON list of messages, like [{"role": "user", '
            '"content": "..."}])',
        ),
        (
            {
                "dialog": json.dumps(
                    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
                )
            },
            "dialog",
            "dataset 'x' row 1: dialog must start with a user message, got 'system'",
        ),
        (
            {"chat_completion_input": _question("q"), "expected_answer": ""},
            "instruct",
            "dataset 'x' row 1: 'expected_answer' is empty; data_format 'instruct' needs it",
        ),
        (
            {"chat_completion_input": _question("q")},
            "instruct",
            "dataset 'x' row 1: missing field 'expected_answer'",
        ),
    ],
)
def test_bad_rows_name_dataset_row_and_column(row: dict, fmt: str, message: str) -> None:
    with pytest.raises(DatasetError) as info:
        check_row(row, fmt, dataset="x", index=1)
    assert str(info.value).startswith(message)


def test_a_bad_row_deep_in_a_file_is_named_by_its_row(tmp_path: Path) -> None:
    rows = [dict(ROWS[0]) for _ in range(300)]
    rows[250] = {"chat_completion_input": "plain text", "expected_answer": "x"}
    with pytest.raises(DatasetError, match=r"^dataset 'big' row 250: chat_completion_input"):
        normalize(_csv(tmp_path / "b.csv", rows), "csv", "instruct", tmp_path / "o", dataset="big")


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_an_unreadable_source_names_dataset_and_path(tmp_path: Path, what: str) -> None:
    path = tmp_path / "x.csv"
    if what == "directory":
        path.mkdir()
    expected = "is a directory, not a file" if what == "directory" else "does not exist"
    with pytest.raises(DatasetError, match=f"^dataset 'x': '{path}' {expected}$"):
        list(iter_rows(path, "csv", dataset="x"))


def test_malformed_files(tmp_path: Path) -> None:
    bad_csv = tmp_path / "b.csv"
    bad_csv.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(DatasetError, match=r"dataset 'b' row 1: 3 cells, the header names 2"):
        list(iter_rows(bad_csv, "csv", dataset="b"))
    bad_jsonl = tmp_path / "b.jsonl"
    bad_jsonl.write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\): a row must be a JSON object"):
        list(iter_rows(bad_jsonl, "jsonl", dataset="b"))
    latin = tmp_path / "l.csv"
    latin.write_bytes("a\n\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        list(iter_rows(latin, "csv", dataset="l"))
    not_parquet = tmp_path / "n.parquet"
    not_parquet.write_text("a,b\n")
    with pytest.raises(DatasetError, match="is not a Parquet file"):
        list(iter_rows(not_parquet, "parquet", dataset="n"))
    header_only = _csv(tmp_path / "h.csv", ROWS[:1])
    header_only.write_text(header_only.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match=r"dataset 'h' .* has 0 rows"):
        normalize(header_only, "csv", "instruct", tmp_path / "o", dataset="h")


@pytest.mark.parametrize(
    ("uri", "fmt"),
    [
        ("/a/train.csv", "csv"),
        ("file:///a/train.JSONL", "jsonl"),
        ("s3://b/k/train.parquet", "parquet"),
        ("https://h/x/train.csv?version=2", "csv"),
        ("/a/train.xlsx", None),
        ("data:text/csv;base64,YQ==", None),
    ],
)
def test_source_format_by_suffix(uri: str, fmt: str | None) -> None:
    assert source_format(uri) == fmt
