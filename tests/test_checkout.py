"""The checkout stands alone: no tracked file refers to anything outside it, and running the
project from its root writes nothing into it.

A clone from the project's public home has nothing beside it, so a path that climbs out of the
repository (a sibling ``shared`` folder, the workplace's ``/work``) works only by accident.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest

from provider.launcher import StackServer
from tests.pipelines.pipeline_helpers import make_request, write_rows
from tests.support import REPO

KFP_TRAINER = Path(sys.executable).with_name("kfp-trainer")

# The workplace's own paths, which a clone does not have.
_WORKPLACE = re.compile(r"\.\./shared\b|(?<![\w./-])/(?:work)/|\b(?:REPO|ROOT|REPO_ROOT)\.parent\b")
# A relative path that starts with one or more ".." steps.
_UPWARD = re.compile(r"(?<![\w./\\-])(?:\.\./)+[\w.-]*")
# Path(__file__)[.resolve()].parents[k] and Path(__file__)[.resolve()].parent.parent...
_FILE_PARENTS = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
_FILE_PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b)+)")
# Upward paths that are data, not references: archive members the extractor must refuse.
NOT_REFERENCES = {("tests/pipelines/test_pipeline_runs.py", "../" * 3 + "etc")}


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    )
    return [name for name in out.stdout.decode().split("\0") if name]


def _escapes(file: str, relative: str) -> bool:
    """Does `relative`, read from the folder `file` is in, lead out of the repository?"""
    return posixpath.normpath(posixpath.join(posixpath.dirname(file), relative)).startswith("..")


def references_outside(file: str, text: str) -> list[str]:
    """``file:line: what`` for every reference in `text` to a path outside the repository."""
    depth = file.count("/")  # Path(__file__).parents[depth] is the repository root
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        hits = [m.group(0) for m in _WORKPLACE.finditer(line)]
        hits += [
            m.group(0)
            for m in _UPWARD.finditer(line)
            if _escapes(file, m.group(0)) and (file, m.group(0)) not in NOT_REFERENCES
        ]
        hits += [m.group(0) for m in _FILE_PARENTS.finditer(line) if int(m.group(1)) > depth]
        hits += [
            m.group(0)
            for m in _FILE_PARENT_CHAIN.finditer(line)
            if m.group(1).count(".parent") - 1 > depth
        ]
        found += [f"{file}:{number}: {hit}" for hit in dict.fromkeys(hits)]
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    files = tracked_files()
    assert "README.md" in files and "tests/test_checkout.py" in files
    found = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        data = path.read_bytes()
        if b"\0" not in data:
            found += references_outside(name, data.decode("utf-8", errors="replace"))
    assert not found, "references outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("file", "line"),
    [
        ("README.md", "checked by (`" + "../" + "shared/tools/validate_knative.py`)"),
        ("tests/knative/manifests.py", "TOOLS = REPO" + ".parent / 'shared' / 'tools'"),
        ("docs/x.md", "see /" + "work/shared/schemas"),
        ("knative/README.md", "the CRDs in [here](" + "../" * 2 + "schemas/knative)"),
        ("tests/support/x.py", "ROOT = Path(__file__).resolve()" + ".parents[3]"),
        ("scripts/x.py", "ROOT = Path(__file__)" + ".parent" * 3),
    ],
)
def test_each_kind_of_outside_reference_is_caught(file, line):
    assert references_outside(file, line), line


@pytest.mark.parametrize(
    ("file", "line"),
    [
        ("provider/README.md", "| `../providers.d/remote/post_training/kfp-torchtune.yaml` |"),
        ("tests/support/__init__.py", "REPO = Path(__file__).resolve()" + ".parents[2]"),
        ("pipelines/staging.py", 'return norm == ".." or norm.startswith("../")'),
        ("pipelines/README.md", "remote runs an `s3://.../jobs/<job_uuid>/` prefix"),
    ],
)
def test_paths_inside_the_repository_pass(file, line):
    assert references_outside(file, line) == []


# ------------------------------------------------------------------------------ a clean checkout


def _checkout_state() -> set[str]:
    """What `git status --porcelain --ignored` shows, and every path on disk (git does not show
    empty directories), except .git and .venv."""
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--ignored"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    on_disk = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not (Path(root) == REPO and d in (".git", ".venv"))]
        rel = Path(root).relative_to(REPO)
        on_disk |= {f"disk: {rel / name}" for name in dirs + files}
    return {f"git: {line}" for line in status} | on_disk


def _env(tmp_path: Path) -> dict[str, str]:
    # Bytecode caches are Python's (gitignored); `make` puts them under .venv. Off here, so any
    # new path in the checkout is one the project wrote.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFP_TRAINER_")}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "KFP_TRAINER_STATE_DIR": str(tmp_path / "st")}


@pytest.mark.timeout(900)
def test_kfp_trainer_run_from_the_repo_root_writes_only_to_the_state_dir(tmp_path):
    before = _checkout_state()
    env = _env(tmp_path)
    model = tmp_path / "models" / "llama3.2-tiny"
    subprocess.run(
        [str(KFP_TRAINER), "tiny-model", "--out", str(model)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    request = make_request(
        "job-clean-checkout", str(model), str(write_rows(tmp_path / "rows.jsonl", 8))
    )
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1, max_validation_steps=1)
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [str(KFP_TRAINER), "run", "--request", str(request_path), "--out", str(result)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(result.read_text())["status"] == "completed"
    assert (tmp_path / "st" / "runs" / "job-clean-checkout" / "result").is_dir()
    assert _checkout_state() - before == set()
    assert not [p for p in _checkout_state() if ".kfp-trainer" in p]


@pytest.mark.timeout(300)
def test_llama_stack_run_from_the_repo_root_writes_nothing_into_it(tmp_path):
    before = _checkout_state()
    env = _env(tmp_path)
    env["KFP_TRAINER_MODEL_STORE"] = str(tmp_path / "models")
    server = StackServer(env, tmp_path)  # runs `llama stack run run.yaml` with cwd = the root
    server.start(timeout_s=180)
    try:
        assert server.healthy()
    finally:
        server.stop()
    assert _checkout_state() - before == set()
    # llama-stack 0.2.12 creates external_providers_dir before it substitutes ${env...} values
    assert not [p for p in _checkout_state() if "${" in p]
