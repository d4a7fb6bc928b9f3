"""Reading llama-stack dataset rows (JSONL) into chat messages, checking every row first.

llama-stack's two post-training formats:

- ``instruct``: ``chat_completion_input`` (a JSON string holding a list with one user message)
  and ``expected_answer`` (a string);
- ``dialog``: ``dialog`` (a JSON string holding the messages, user first, at least one
  assistant turn).

Every row is checked before training starts; an error names the file, the line and the field.
No torch here: the recipe turns the messages into tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ROLES: Final = ("system", "user", "assistant")
_FIELDS: Final = {
    "instruct": ("chat_completion_input", "expected_answer"),
    "dialog": ("dialog",),
}


class DatasetError(ValueError):
    """A dataset file or row the recipe cannot use; the message names file, line and field."""


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is system, user or assistant."""

    role: str
    content: str


def _text(content: Any, where: str) -> str:
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
        return "".join(_text(item, where) for item in content)
    raise DatasetError(
        f"{where}: content must be text (a string or text items), got {json.dumps(content)[:80]}"
    )


def _messages(value: Any, where: str) -> list[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise DatasetError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise DatasetError(f"{where} must hold a JSON list of messages")
    return value


def _turn(message: Any, where: str) -> Turn:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DatasetError(f"{where}: each message needs 'role' and 'content'")
    role = message["role"]
    if role not in ROLES:
        raise DatasetError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    return Turn(role=role, content=_text(message["content"], where))


def row_turns(row: Any, data_format: str, where: str) -> list[Turn]:
    """The conversation one row holds, or a :class:`DatasetError` naming what is wrong."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object")
    needed = _FIELDS[data_format]
    missing = [f for f in needed if f not in row]
    if missing:
        raise DatasetError(
            f"{where}: missing field {missing[0]!r}; data_format {data_format!r} needs "
            f"{' and '.join(needed)} (row has: {', '.join(sorted(row)) or 'nothing'})"
        )
    if data_format == "instruct":
        msgs = _messages(row["chat_completion_input"], f"{where}: chat_completion_input")
        if len(msgs) != 1:
            raise DatasetError(
                f"{where}: chat_completion_input must hold exactly one user "
                f"message, got {len(msgs)}"
            )
        user = _turn(msgs[0], f"{where}: chat_completion_input[0]")
        if user.role != "user":
            raise DatasetError(
                f"{where}: chat_completion_input[0] must be a user message, got role {user.role!r}"
            )
        answer = row["expected_answer"]
        if not isinstance(answer, str):
            raise DatasetError(f"{where}: expected_answer must be a string")
        return [user, Turn(role="assistant", content=answer)]
    msgs = _messages(row["dialog"], f"{where}: dialog")
    turns = [_turn(m, f"{where}: dialog[{i}]") for i, m in enumerate(msgs)]
    if len(turns) < 2:
        raise DatasetError(
            f"{where}: dialog must hold at least a user and an assistant message, got {len(turns)}"
        )
    if turns[0].role != "user":
        raise DatasetError(f"{where}: dialog must start with a user message, got {turns[0].role!r}")
    if not any(t.role == "assistant" for t in turns):
        raise DatasetError(f"{where}: dialog has no assistant message to learn from")
    return turns


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


__all__ = ["DatasetError", "Turn", "read_dataset", "row_turns"]
