"""The provider's log lines through a real ``llama stack run``: llama-stack's levels and formats.

The JSON format itself, through a full local run, is checked in test_provider_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provider.launcher import StackServer

pytestmark = pytest.mark.timeout(300)

READY = "kfp-torchtune provider ready"


def _started_and_stopped(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The lines of llama-stack's log file and console for one start and stop."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    server = StackServer(
        {
            "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
            "KFP_TRAINER_MODEL_STORE": str(tmp_path / "models"),
            "KFP_TRAINER_BACKEND": "hold",
            **env,
        },
        tmp_path,
    )
    server.start()
    server.stop()
    return [
        line
        for path in (server.log_file, server.console_log)
        for line in path.read_text().splitlines()
    ]


def test_log_format_text_leaves_llama_stacks_format(tmp_path) -> None:
    lines = _started_and_stopped(tmp_path, {"KFP_TRAINER_LOG_FORMAT": "text"})
    ready = [line for line in lines if READY in line]
    assert len(ready) == 2  # file and console
    assert all("provider.impl:" in line and f"core: {READY}" in line for line in ready)
    assert not [line for line in lines if line.startswith("{")]


def test_levels_follow_llama_stack_logging(tmp_path) -> None:
    """LLAMA_STACK_LOGGING's core level is the provider's: at warning, no info line of ours."""
    quiet = _started_and_stopped(tmp_path / "quiet", {"LLAMA_STACK_LOGGING": "core=warning"})
    assert not [line for line in quiet if READY in line]
    assert [line for line in quiet if "server: Listening on" in line]  # llama-stack's own
    loud = _started_and_stopped(tmp_path / "loud", {"LLAMA_STACK_LOGGING": "core=info"})
    (in_file, on_console) = [json.loads(line) for line in loud if READY in line]
    assert in_file == on_console
    assert (in_file["level"], in_file["logger"], in_file["category"]) == (
        "INFO",
        "provider.impl",
        "core",
    )
