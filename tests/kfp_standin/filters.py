"""The KFP list filter (a JSON-serialised ``Filter`` protobuf), evaluated over plain records.

The SDK sends ``filter`` exactly as the caller wrote it (``json.dumps({"predicates": [...]})``),
with protojson spellings (``stringValue``) or proto field names (``string_value``); the real API
server accepts both, and so does this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "EQUALS": lambda have, want: have == want,
    "NOT_EQUALS": lambda have, want: have != want,
    "GREATER_THAN": lambda have, want: have is not None and have > want,
    "GREATER_THAN_EQUALS": lambda have, want: have is not None and have >= want,
    "LESS_THAN": lambda have, want: have is not None and have < want,
    "LESS_THAN_EQUALS": lambda have, want: have is not None and have <= want,
    "IN": lambda have, want: have in want,
    "IS_SUBSTRING": lambda have, want: isinstance(have, str) and want in have,
}
# The proto enum's numbers, which protojson also accepts.
_OP_NUMBERS = {
    1: "EQUALS",
    2: "NOT_EQUALS",
    3: "GREATER_THAN",
    5: "GREATER_THAN_EQUALS",
    6: "LESS_THAN",
    7: "LESS_THAN_EQUALS",
    8: "IN",
    9: "IS_SUBSTRING",
}
_VALUE_FIELDS = {
    "stringValue": "string",
    "string_value": "string",
    "intValue": "int",
    "int_value": "int",
    "longValue": "int",
    "long_value": "int",
    "timestampValue": "timestamp",
    "timestamp_value": "timestamp",
    "intValues": "list",
    "int_values": "list",
    "longValues": "list",
    "long_values": "list",
    "stringValues": "list",
    "string_values": "list",
}


class FilterError(ValueError):
    """The filter is not valid; the message names the offending part (answered as 400)."""


Predicate = Callable[[dict[str, Any]], bool]


def parse_filter(raw: str | None, keys: frozenset[str]) -> Predicate:
    """Turn the ``filter`` query parameter into a predicate over records with ``keys``."""
    if not raw:
        return lambda _record: True
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FilterError(f"filter is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FilterError("filter must be a JSON object with 'predicates'")
    checks = [_predicate(p, keys) for p in doc.get("predicates") or []]
    return lambda record: all(check(record) for check in checks)


def _predicate(p: Any, keys: frozenset[str]) -> Predicate:
    if not isinstance(p, dict):
        raise FilterError(f"filter predicate {p!r} is not an object")
    op = p.get("operation") or p.get("op")
    op = _OP_NUMBERS.get(op, op) if isinstance(op, int) else op
    if op not in _OPS:
        raise FilterError(f"filter predicate operation {op!r} is not supported")
    key = p.get("key")
    if key not in keys:
        raise FilterError(f"filter key {key!r} is not one of: {', '.join(sorted(keys))}")
    values = [(name, p[name]) for name in _VALUE_FIELDS if name in p]
    if len(values) != 1:
        raise FilterError(f"filter predicate on {key!r} needs exactly one value field")
    name, want = values[0]
    if _VALUE_FIELDS[name] == "list":
        want = want.get("values", []) if isinstance(want, dict) else want
        if op != "IN":
            raise FilterError(f"filter predicate on {key!r}: a list value needs operation IN")
    elif op == "IN":
        raise FilterError(f"filter predicate on {key!r}: operation IN needs a list value")
    elif _VALUE_FIELDS[name] == "int":
        want = int(want)
    elif _VALUE_FIELDS[name] == "timestamp":  # compared as instants, not as strings
        moment = _instant(want, key)
        compare = _OPS[op]
        return lambda record: compare(_instant(record.get(key), key), moment)
    compare = _OPS[op]
    return lambda record: compare(record.get(key), want)


def _instant(value: Any, key: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"filter predicate on {key!r}: {value!r} is not a timestamp") from None


def equals_value(raw: str | None, key: str) -> str | None:
    """The string an ``EQUALS`` predicate on ``key`` asks for, when the filter has one (its
    predicates are ANDed, so every match has that value: what an index lookup can use); None
    otherwise, or when the filter is not valid (:func:`parse_filter` says why)."""
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return None
    predicates = doc.get("predicates") if isinstance(doc, dict) else None
    for p in predicates if isinstance(predicates, list) else []:
        if not isinstance(p, dict) or p.get("key") != key:
            continue
        op = p.get("operation") or p.get("op")
        if op in ("EQUALS", 1):
            value = p.get("stringValue", p.get("string_value"))
            if isinstance(value, str):
                return value
    return None
