"""``kfp-trainer``: the composed command line and the ``train`` client's edges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from provider import cli
from provider.client import render_bar
from tests.support.loopback import free_port

KFP_TRAINER = Path(sys.executable).with_name("kfp-trainer")


def test_every_part_contributes_its_commands() -> None:
    out = subprocess.run(
        [str(KFP_TRAINER), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    for command in ("tiny-model", "compile", "run", "serve", "send", "upload-model", "train"):
        assert f"    {command}" in out.stdout, command


def test_an_absent_part_is_skipped_but_a_broken_one_is_not(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_part").mkdir()
    (tmp_path / "broken_part" / "__init__.py").write_text("")
    (tmp_path / "broken_part" / "cli.py").write_text("import definitely_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "PARTS", ("absent_part.cli",))
    help_text = cli.build_parser().format_help()
    assert "train" in help_text
    monkeypatch.setattr(cli, "PARTS", ("broken_part.cli",))
    with pytest.raises(ModuleNotFoundError, match="definitely_missing_dependency"):
        cli.build_parser()


def test_train_needs_a_dataset(capsys) -> None:
    assert cli.main(["train", "--url", "http://127.0.0.1:9"]) == 2
    assert "give --dataset FILE.csv or --dataset-id ID" in capsys.readouterr().err


def test_train_reports_an_unreachable_server(tmp_path, capsys) -> None:
    port = free_port()
    data = tmp_path / "d.csv"
    data.write_text("chat_completion_input,expected_answer\n")
    assert cli.main(["train", "--url", f"http://127.0.0.1:{port}", "--dataset", str(data)]) == 1
    assert "error: Connection error" in capsys.readouterr().err


def test_train_names_a_missing_dataset_file(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.csv"
    assert cli.main(["train", "--url", "http://127.0.0.1:9", "--dataset", str(missing)]) == 1
    assert f"dataset file {str(missing)!r} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "progress", "expected"),
    [
        ("scheduled", None, "[" + "." * 30 + "]  step 0/?  scheduled  0s"),
        (
            "scheduled",
            {"phase": "staging", "rows_staged": 12500, "bytes_staged": 10},
            "[" + "." * 30 + "]  step 0/?  staging: 12,500 rows  scheduled  4s",
        ),
        (
            "in_progress",
            {"step": 3, "total_steps": 12, "epoch": 0, "loss": 2.71828},
            "[" + "#" * 7 + "." * 23 + "]  step 3/12  epoch 0  loss 2.718  in_progress  4s",
        ),
        ("completed", {"step": 12, "total_steps": 12}, "[" + "#" * 30 + "]  step 12/12"),
    ],
)
def test_progress_bar(status, progress, expected) -> None:
    line = render_bar(SimpleNamespace(status=status, progress=progress), 4.2 if progress else 0)
    assert line.startswith(expected)
