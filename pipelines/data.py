"""llama-stack dataset rows: reading them from a file, checking them, turning them into messages.

llama-stack's two post-training formats:

- ``instruct``: ``chat_completion_input`` (a JSON string holding a list with one user message)
  and ``expected_answer`` (a string);
- ``dialog``: ``dialog`` (a JSON string holding the messages, user first, at least one
  assistant turn).

A dataset passed by reference (CSV, JSONL or Parquet) is read here with llama-stack's datasetio
row shape: one dict per row keyed by column name, JSON kept as text in the cell until the
format's check parses it. Unlike datasetio (pandas), every cell stays the text it was: ``007``,
``3.50``, ``1e3`` and ``NA`` reach the trainer as written. Every row is checked before training
starts; an error names the dataset, the row (counting from 0, as datasetio's ``start_index``
does) and the column. No torch here: the recipe turns the messages into tokens.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlparse

ROLES: Final = ("system", "user", "assistant")
_FIELDS: Final = {
    "instruct": ("chat_completion_input", "expected_answer"),
    "dialog": ("dialog",),
}
# The file formats a dataset may have when the trainer reads it itself, by file name suffix.
SOURCE_FORMATS: Final = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
_PARQUET_BATCH_ROWS: Final = 4096
_EXAMPLE_MESSAGES: Final = '[{"role": "user", "content": "..."}]'
# One encoder for every row: json.dumps with options builds a new encoder on each call.
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False).encode


class DatasetError(ValueError):
    """A dataset file or row the recipe cannot use; the message names file, line and field."""


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is system, user or assistant."""

    role: str
    content: str


def _at(where: str, field: str, index: int | None = None) -> str:
    """Where a problem is, for its message: built only when there is one (rows are many)."""
    return f"{where}: {field}" if index is None else f"{where}: {field}[{index}]"


def _text(content: Any, where: str, field: str, index: int) -> str:
    """Message content as text: a string, a text item or a list of text items."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, dict)
        and content.get("type", "text") == "text"
        and isinstance(content.get("text"), str)
    ):
        return content["text"]
    if isinstance(content, list) and content:
        return "".join(_text(item, where, field, index) for item in content)
    raise DatasetError(
        f"{_at(where, field, index)}: content must be text (a string or text items), got "
        f"{json.dumps(content)[:80]}"
    )


def _messages(value: Any, where: str, field: str) -> list[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise DatasetError(
                f"{_at(where, field)} is not valid JSON: {exc} (it must hold a JSON list of "
                f"messages, like {_EXAMPLE_MESSAGES})"
            ) from None
    if not isinstance(value, list):
        raise DatasetError(
            f"{_at(where, field)} must hold a JSON list of messages, like {_EXAMPLE_MESSAGES}; "
            f"got {json.dumps(value)[:80]}"
        )
    return value


def _turn(message: Any, where: str, field: str, index: int) -> Turn:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DatasetError(f"{_at(where, field, index)}: each message needs 'role' and 'content'")
    role = message["role"]
    if role not in ROLES:
        raise DatasetError(
            f"{_at(where, field, index)}: role {role!r} is not one of {', '.join(ROLES)}"
        )
    return Turn(role, _text(message["content"], where, field, index))


def row_turns(row: Any, data_format: str, where: str) -> list[Turn]:
    """The conversation one row holds, or a :class:`DatasetError` naming what is wrong."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object")
    needed = _FIELDS[data_format]
    for field in needed:
        value = row.get(field)
        if value is None or value == "":
            if field not in row:
                raise DatasetError(
                    f"{where}: missing field {field!r}; data_format {data_format!r} needs "
                    f"{' and '.join(needed)} (row has: {', '.join(sorted(row)) or 'nothing'})"
                )
            raise DatasetError(f"{where}: {field!r} is empty; data_format {data_format!r} needs it")
    if data_format == "instruct":
        msgs = _messages(row["chat_completion_input"], where, "chat_completion_input")
        if len(msgs) != 1:
            raise DatasetError(
                f"{where}: chat_completion_input must hold exactly one user "
                f"message, got {len(msgs)}"
            )
        user = _turn(msgs[0], where, "chat_completion_input", 0)
        if user.role != "user":
            raise DatasetError(
                f"{where}: chat_completion_input[0] must be a user message, got role {user.role!r}"
            )
        answer = row["expected_answer"]
        if not isinstance(answer, str):
            raise DatasetError(
                f"{where}: expected_answer must be a string (text), got {json.dumps(answer)[:80]}"
            )
        return [user, Turn("assistant", answer)]
    msgs = _messages(row["dialog"], where, "dialog")
    turns = [_turn(m, where, "dialog", i) for i, m in enumerate(msgs)]
    if len(turns) < 2:
        raise DatasetError(
            f"{where}: dialog must hold at least a user and an assistant message, got {len(turns)}"
        )
    if turns[0].role != "user":
        raise DatasetError(f"{where}: dialog must start with a user message, got {turns[0].role!r}")
    if not any(t.role == "assistant" for t in turns):
        raise DatasetError(f"{where}: dialog has no assistant message to learn from")
    return turns


def source_format(uri: str) -> str | None:
    """``csv``, ``jsonl`` or ``parquet`` by the URI's file name suffix; None for anything else."""
    name = urlparse(uri).path if "://" in uri else uri
    return SOURCE_FORMATS.get(Path(name).suffix.lower())


def _text_cell(value: Any) -> Any:
    """A typed (Parquet) cell as datasetio's row shape without type guessing: numbers and dates
    as their text, text, booleans, nulls and nested lists/objects as they are."""
    if value is None or isinstance(value, str | bool | list | dict):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _csv_rows(fh: IO[str], where: str) -> Iterator[dict[str, Any]]:
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return
    for index, cells in enumerate(filter(None, reader)):  # blank lines hold no row
        if len(cells) > len(header):
            raise DatasetError(
                f"{where} row {index}: {len(cells)} cells, the header names {len(header)} columns"
            )
        if len(cells) == len(header):
            yield dict(zip(header, cells, strict=True))
        else:  # a short row: the cells it lacks are absent values, as pandas has them
            yield {name: (cells[i] if i < len(cells) else None) for i, name in enumerate(header)}


def _jsonl_rows(fh: IO[str], where: str) -> Iterator[dict[str, Any]]:
    index = 0
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            # Numbers keep their text (3.50 stays "3.50"), as a CSV cell would.
            row = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
        except ValueError as exc:
            raise DatasetError(
                f"{where} row {index} (line {lineno}): not valid JSON: {exc}"
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where} row {index} (line {lineno}): a row must be a JSON object")
        yield row
        index += 1


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield {k: _text_cell(v) for k, v in row.items()}


def iter_rows(path: Path, file_format: str, *, dataset: str) -> Iterator[dict[str, Any]]:
    """The rows of a dataset file in order, in datasetio's shape, every cell as its text.

    :param dataset: how messages name the dataset (its registered id, or the file name).
    :raises DatasetError: an unreadable file, bad UTF-8, a malformed line (dataset and row named).
    """
    where = f"dataset {dataset!r}"
    path = Path(path)
    if file_format not in SOURCE_FORMATS.values():
        raise DatasetError(
            f"{where}: format {file_format!r} is not one of {', '.join(SOURCE_FORMATS.values())}"
        )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DatasetError(f"{where}: {str(path)!r} {what}")
    try:
        if file_format == "parquet":
            try:
                yield from _parquet_rows(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise DatasetError(f"{where}: {str(path)!r} is not a Parquet file: {exc}") from None
            return
        # utf-8-sig: a byte-order mark is not part of the first column's name (pandas agrees).
        with path.open(encoding="utf-8-sig", newline="") as fh:
            if file_format == "csv":
                try:
                    yield from _csv_rows(fh, where)
                except csv.Error as exc:
                    raise DatasetError(f"{where}: {str(path)!r} is not valid CSV: {exc}") from None
            else:
                yield from _jsonl_rows(fh, where)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: {str(path)!r} is not UTF-8 text: {exc}") from None


def check_row(row: Any, data_format: str, *, dataset: str, index: int) -> list[Turn]:
    """One row's conversation, or a :class:`DatasetError` naming the dataset, row and column."""
    return row_turns(row, data_format, f"dataset {dataset!r} row {index}")


@dataclass(frozen=True)
class DatasetRead:
    """What the trainer read from one dataset: recorded in the run's result.

    ``sha256`` is of the bytes read; ``rows_sha256`` of the conversations they hold (equal for
    the same rows, whichever file format or path brought them).
    """

    dataset: str
    uri: str
    format: str
    rows: int
    sha256: str
    rows_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def rows_digest() -> Any:
    """A running digest of conversations (see :func:`add_turns`)."""
    return hashlib.sha256()


def add_turns(digest: Any, turns: list[Turn]) -> None:
    digest.update(_ENCODE([[t.role, t.content] for t in turns]).encode())
    digest.update(b"\n")


def normalize(
    path: Path, file_format: str, data_format: str, out: Path, *, dataset: str, uri: str = ""
) -> DatasetRead:
    """Check every row of ``path`` and write them to ``out`` as the JSONL the recipe reads.

    :raises DatasetError: a bad row (dataset, row and column named) or 0 rows.
    """
    if data_format not in _FIELDS:
        raise DatasetError(f"data_format {data_format!r} is not one of {', '.join(_FIELDS)}")
    digest = rows_digest()
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for index, row in enumerate(iter_rows(path, file_format, dataset=dataset)):
            add_turns(digest, check_row(row, data_format, dataset=dataset, index=index))
            fh.write(_ENCODE(row) + "\n")
            count += 1
    if count == 0:
        raise DatasetError(f"dataset {dataset!r} ({str(path)!r}) has 0 rows; nothing to train on")
    return DatasetRead(
        dataset=dataset,
        uri=uri or str(path),
        format=file_format,
        rows=count,
        sha256=file_sha256(path),
        rows_sha256=digest.hexdigest(),
    )


def read_dataset(path: Path, data_format: str, *, label: str = "dataset") -> list[list[Turn]]:
    """Every row of a JSONL file as turns; blank lines are skipped, anything else is checked.

    :raises DatasetError: unreadable file, 0 rows, or a bad row (file, line and field named).
    """
    if data_format not in _FIELDS:
        raise DatasetError(f"data_format {data_format!r} is not one of {', '.join(_FIELDS)}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{label} file {str(path)!r} does not exist")
    rows: list[list[Turn]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{label} {path.name} line {lineno}"
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DatasetError(f"{where}: not valid JSON: {exc}") from None
                rows.append(row_turns(row, data_format, where))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{label} file {str(path)!r} is not UTF-8 text: {exc}") from None
    if not rows:
        raise DatasetError(f"{label} file {str(path)!r} has 0 rows")
    return rows


__all__ = [
    "SOURCE_FORMATS",
    "DatasetError",
    "DatasetRead",
    "Turn",
    "add_turns",
    "check_row",
    "file_sha256",
    "iter_rows",
    "normalize",
    "read_dataset",
    "row_turns",
    "rows_digest",
    "source_format",
]
