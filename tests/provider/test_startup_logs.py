"""provider/startup_logs: the .pth hook that makes llama-stack's start-up lines JSON, in real
interpreter starts (the venv's own editable install) and in a wheel built from the sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipelines.logs import COMMON_FIELDS
from provider import build_py

ROOT = Path(__file__).resolve().parents[2]
PTH_TEXT = build_py.PTH.read_text()

# llama-stack's logging set-up at import, a record of its CLI's logger, a Python warning.
STARTS_LIKE_THE_CLI = """
import logging, warnings
from llama_stack.log import get_logger
get_logger("llama_stack.cli.stack.run", category="server").info("Using run configuration")
warnings.warn("a warning while starting")
print("handlers:", [type(h).__name__ for h in logging.getLogger().handlers])
"""


def _python(code: str, log_format: str | None) -> subprocess.CompletedProcess[str]:
    unset = ("KFP_TRAINER_LOG_FORMAT", "LLAMA_STACK_LOGGING")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if log_format is not None:
        env["KFP_TRAINER_LOG_FORMAT"] = log_format
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",  # the hook comes from site-packages, not from the checkout on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_the_venv_has_the_hook_at_site_packages_root() -> None:
    installed = Path(sysconfig.get_paths()["purelib"], build_py.INSTALLED_AS)
    assert installed.read_text() == PTH_TEXT


def test_with_json_every_line_of_llama_stacks_start_is_a_json_record() -> None:
    done = _python(STARTS_LIKE_THE_CLI, "json")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    *logged, handlers = lines
    records = [json.loads(line) for line in logged]
    assert all(tuple(r)[: len(COMMON_FIELDS)] == COMMON_FIELDS for r in records)
    by_logger = {r["logger"]: r for r in records}
    assert by_logger["llama_stack.cli.stack.run"]["msg"] == "Using run configuration"
    assert by_logger["llama_stack.cli.stack.run"]["category"] == "server"
    assert "a warning while starting" in by_logger["py.warnings"]["msg"]
    assert "RichHandler" not in handlers and "CustomRichHandler" not in handlers
    assert not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("log_format", [None, "text"])
def test_without_an_explicit_json_llama_stack_keeps_its_format(log_format) -> None:
    done = _python(STARTS_LIKE_THE_CLI, log_format)
    assert "CustomRichHandler" in done.stdout
    assert not [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert "a warning while starting" in done.stderr  # Python's own warning output


def test_a_process_that_never_imports_llama_stack_is_left_alone() -> None:
    """The handler, KFP's task processes: no llama-stack import, so no handler and no capture."""
    done = _python(
        "import logging, sys, warnings; import pipelines.logs;"
        "print(logging.getLogger().handlers, 'llama_stack' in sys.modules,"
        " warnings.showwarning.__module__)",
        "json",
    )
    assert done.stdout.split() == ["[]", "False", "warnings"]


def test_a_wheel_built_from_the_sources_installs_the_hook_at_its_root(tmp_path) -> None:
    """A regular (non-editable) build: the .pth at the wheel's root, in its RECORD (so pip
    uninstalls it), next to the packages."""
    src = tmp_path / "src"
    for package in ("handler", "pipelines", "provider"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        assert whl.read(build_py.INSTALLED_AS).decode() == PTH_TEXT
        (record,) = [n for n in whl.namelist() if n.endswith(".dist-info/RECORD")]
        assert f"{build_py.INSTALLED_AS}," in whl.read(record).decode()
        assert "provider/startup_logs.py" in whl.namelist()
