"""The server's log lines through a real ``llama stack run``: llama-stack's levels, the formats.

The JSON format through a full local fine-tune is checked in test_provider_e2e.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from provider.launcher import StackServer
from tests.provider import server_log

pytestmark = pytest.mark.timeout(300)

READY = "kfp-torchtune provider ready"
STATUS = "/v1/post-training/job/status"
# uvicorn's own access line: 'INFO:     127.0.0.1:PORT - "GET /v1/health HTTP/1.1" 200 OK'
UVICORN_ACCESS = re.compile(r'^INFO: +127\.0\.0\.1:\d+ - "GET /v1/health HTTP/1\.1" 200')


def _served(tmp_path: Path, env: dict[str, str]) -> StackServer:
    """A server started, asked for its health, a missing route and an unknown job (llama-stack
    logs that one's traceback), then stopped."""
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
    try:
        assert requests.get(server.url + "/v1/no-such-route", timeout=10).status_code == 404
        unknown = requests.get(server.url + STATUS, params={"job_uuid": "nope"}, timeout=10)
        assert unknown.status_code == 400
    finally:
        server.stop()
    return server


def _started_and_stopped(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The lines of llama-stack's log file and console for one start and stop."""
    server = _served(tmp_path, env)
    return [
        line
        for path in (server.log_file, server.console_log)
        for line in path.read_text().splitlines()
    ]


def test_log_format_json_makes_every_line_of_the_server_json(tmp_path) -> None:
    """With KFP_TRAINER_LOG_FORMAT=json every line on the console (stdout and stderr) and in
    the log file is one JSON object: llama-stack's records from its CLI's first on (its run
    configuration, pydantic's warning), uvicorn's (access lines with their fields), ours; a
    traceback stays in its record."""
    server = _served(tmp_path, {"KFP_TRAINER_LOG_FORMAT": "json"})
    for console, path in ((True, server.console_log), (False, server.log_file)):
        logged = server_log.records(path, console=console)
        by = {r["logger"] for r in logged}
        assert {"provider.impl", "llama_stack.distribution.server.server"} <= by, path
        (failed,) = [r for r in logged if r["msg"].startswith("Error executing endpoint")]
        assert failed["level"] == "ERROR" and failed["category"] == "server"
        assert "JobNotFound: job 'nope' not found" in failed["exc"]
        if console:  # uvicorn's handlers write to the console only
            access = {
                (r["method"], r["path"], r["status"]) for r in logged if r["msg"] == "request"
            }
            assert {("GET", "/v1/health", 200), ("GET", "/v1/no-such-route", 404)} <= access
            assert {("GET", STATUS, 400)} <= access
            (unknown,) = [r for r in logged if r.get("path") == STATUS]
            assert (unknown["logger"], unknown["query"]) == ("uvicorn.access", "job_uuid=nope")
            assert "Application startup complete." in {r["msg"] for r in logged}


def test_run_yamls_default_json_leaves_llama_stacks_start_up_lines(tmp_path, monkeypatch) -> None:
    """Unset, run.yaml's default json: llama-stack's lines before the provider's start keep its
    format (the .pth hook acts only on an explicit json); from the provider's start on, JSON."""
    monkeypatch.delenv("KFP_TRAINER_LOG_FORMAT", raising=False)
    server = _served(tmp_path, {})
    for console, path in ((True, server.console_log), (False, server.log_file)):
        logged = server_log.records(path, console=console, startup_json=False)
        assert {"provider.impl", "uvicorn.access"} & {r["logger"] for r in logged}, path


def test_log_format_text_leaves_llama_stacks_format(tmp_path) -> None:
    lines = _started_and_stopped(tmp_path, {"KFP_TRAINER_LOG_FORMAT": "text"})
    ready = [line for line in lines if READY in line]
    assert len(ready) == 2  # file and console
    assert all("provider.impl:" in line and f"core: {READY}" in line for line in ready)
    assert not [line for line in lines if line.startswith("{")]
    assert [line for line in lines if UVICORN_ACCESS.match(line)]  # uvicorn's own format
    assert [line for line in lines if "Traceback (most recent call last)" in line]  # rich's panel


def test_levels_follow_llama_stack_logging(tmp_path) -> None:
    """LLAMA_STACK_LOGGING's core level is the provider's: at warning, no info line of ours."""
    quiet = _started_and_stopped(tmp_path / "quiet", {"LLAMA_STACK_LOGGING": "core=warning"})
    assert not [line for line in quiet if READY in line]
    # llama-stack's own line, as JSON
    assert [line for line in quiet if line.startswith("{") and '"msg": "Listening on' in line]
    loud_env = {"LLAMA_STACK_LOGGING": "core=info", "KFP_TRAINER_LOG_FORMAT": "json"}
    loud = _started_and_stopped(tmp_path / "loud", loud_env)
    (in_file, on_console) = [json.loads(line) for line in loud if READY in line]
    assert in_file == on_console
    # llama-stack prints that it found the variable outside logging: a record here, too
    found = [json.loads(line) for line in loud if "LLAMA_STACK_LOGGING found" in line]
    assert [(r["logger"], r["msg"]) for r in found] == 2 * [  # file and console
        ("llama_stack.log", "Environment variable LLAMA_STACK_LOGGING found: core=info")
    ]
    assert all(line.startswith("{") for line in loud if line.strip())
    assert (in_file["level"], in_file["logger"], in_file["category"]) == (
        "INFO",
        "provider.impl",
        "core",
    )
