"""Reading a ``llama stack run`` log written with ``log_format: json``.

With ``KFP_TRAINER_LOG_FORMAT=json`` in the server's environment every line is one JSON
object, llama-stack's start-up lines among them (provider/startup_logs.py). With the variable
unset (run.yaml's default is json too) llama-stack writes a few lines in its own format before
it imports any provider (its CLI's lines, the run configuration, loading providers.d), and every
line from the provider's first on is JSON. :func:`records` checks either and returns the records.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

from pipelines.logs import COMMON_FIELDS

# The last line llama-stack writes before it builds the providers.
LAST_BEFORE_PROVIDERS: Final = "Successfully loaded external provider remote::kfp-torchtune"
# Who writes those lines: the CLI, the server's main, providers.d loading.
BEFORE_PROVIDERS: Final = frozenset(
    {
        "llama_stack.cli.stack.run",
        "llama_stack.distribution.server.server",
        "llama_stack.distribution.distribution",
    }
)
# A record in llama-stack's format: rich's on the console, "<time> name:line category: " in
# its log file.
_RECORD: Final = re.compile(
    r"^(?:[A-Z]+ +)?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<logger>\S+):\d+ \S+: "
)
# pydantic's warning about llama-stack's own StackRunConfig, printed when its CLI imports it.
_PYDANTIC_WARNING: Final = re.compile(r"UnsupportedFieldAttributeWarning|^  warnings\.warn\($")


def records(path: Path, *, console: bool, startup_json: bool = True) -> list[dict[str, Any]]:
    """The JSON records of the log at ``path``, after checking its lines.

    ``startup_json`` (the server ran with ``KFP_TRAINER_LOG_FORMAT=json``): every non-empty
    line is a JSON object with the common fields first, llama-stack's start-up records among
    them (its CLI's, the server main's, the providers.d loading, up to
    :data:`LAST_BEFORE_PROVIDERS`). Else: before the first JSON line only llama-stack's own,
    ending with :data:`LAST_BEFORE_PROVIDERS`; from it on, JSON objects as above.

    ``console``: the server's stdout and stderr (else its log file, whose run configuration
    lines, without ``startup_json``, are bare YAML).
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if startup_json:
        parsed = _json_records(path, lines)
        upto = next(i for i, r in enumerate(parsed) if LAST_BEFORE_PROVIDERS in r["msg"])
        startup = parsed[: upto + 1]
        assert {r["logger"] for r in startup} >= BEFORE_PROVIDERS, (path, startup[:3])
        assert "Run configuration:" in {r["msg"] for r in startup}, path
        return parsed
    first = next((i for i, line in enumerate(lines) if line.startswith("{")), len(lines))
    before, after = lines[:first], lines[first:]
    assert before and LAST_BEFORE_PROVIDERS in before[-1], (path, before[-3:])
    writers = {m["logger"] for line in before if (m := _RECORD.match(line))}
    assert writers == BEFORE_PROVIDERS, (path, writers)
    if console:  # records, their continuation lines (rich indents them), pydantic's warning
        strays = [
            line
            for line in before
            if not (
                _RECORD.match(line) or line.startswith(" " * 9) or _PYDANTIC_WARNING.search(line)
            )
        ]
        assert not strays, (path, strays[:5])
    return _json_records(path, after)


def _json_records(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    """Each line as a JSON object whose first fields are the common ones."""
    parsed = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path}: not a JSON line: {line!r}") from None
        assert isinstance(record, dict), (path, line)
        assert tuple(record)[: len(COMMON_FIELDS)] == COMMON_FIELDS, (path, line)
        parsed.append(record)
    return parsed
