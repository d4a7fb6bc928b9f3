"""The Containerfile's two targets, checked without a container engine.

No image can be built here, so what the images promise is held against the project: the pins
match pyproject.toml's `train` extra, the handler target leaves that extra (and torch) out, both
run as non-root, and everything COPY names exists and survives .containerignore.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.knative.manifests import REPO

CONTAINERFILE = REPO / "Containerfile"
IGNORE_FILE = REPO / ".containerignore"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions():
        if keyword == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


def _lineage(name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    stages = _stages()
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def _train_pins() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for requirement in pyproject["project"]["optional-dependencies"]["train"]:
        name, sep, version = requirement.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    return pins


def test_both_targets_exist():
    assert {"handler", "trainer"} <= set(_stages())


@pytest.mark.parametrize("target", ["handler", "trainer"])
def test_targets_run_as_a_non_root_user(target):
    users = [u for stage in reversed(_lineage(target)) for u in stage.args("USER")]
    assert users, f"{target} never sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{target} runs as {users[-1]!r}; use a numeric uid"


def test_handler_target_installs_the_project_without_the_train_extra():
    runs = " ".join(run for stage in _lineage("handler") for run in stage.args("RUN"))
    assert "/wheels/" in runs, "the handler installs the project wheel"
    assert "[train" not in runs
    assert not re.search(r"\btorch(tune|ao)?\s*==", runs), "no torch in the handler image"
    assert "import torch" in runs, "the build asserts torch is absent"


def test_handler_target_serves_the_app_factory_with_the_gunicorn_config():
    (cmd,) = _stages()["handler"].args("CMD")
    argv = json.loads(cmd)
    assert argv[0] == "gunicorn"
    assert argv[argv.index("--config") + 1] == "python:handler.gunicorn_conf"
    assert argv[-1] == "handler:create_app()"
    assert (REPO / "handler" / "gunicorn_conf.py").is_file()
    assert "8080" in _stages()["handler"].args("EXPOSE")


def test_trainer_pins_match_the_train_extra():
    pins = _train_pins()
    assert {"torch", "torchtune", "torchao"} <= set(pins)
    runs = " ".join(_stages()["trainer"].args("RUN"))
    for name in ("torch", "torchtune", "torchao"):
        found = re.findall(rf'"{name}==([^"]+)"', runs)
        assert found == [pins[name]], f"{name}: Containerfile {found} vs pyproject {pins[name]}"
    assert '.whl)[train]"' in runs, "the trainer installs the project with the train extra"


def test_trainer_torch_variant_is_a_build_argument():
    args = " ".join(_stages()["trainer"].args("ARG"))
    assert "TORCH_VARIANT=cpu" in args
    assert "${TORCH_VARIANT}" in args


def _ignore_patterns() -> list[str]:
    lines = IGNORE_FILE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(relative: str) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in _ignore_patterns():
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix.split("/")[-1], bare):
                return True
    return False


def test_copied_sources_exist_and_are_in_the_build_context():
    copied = []
    for stage in _stages().values():
        for arg in stage.args("COPY"):
            if arg.startswith("--from"):
                continue
            copied.extend(arg.split()[:-1])
    assert "pyproject.toml" in copied and "handler" in copied and "pipelines" in copied
    for source in copied:
        assert not _ignored(source), f"{source} is excluded by .containerignore"
        if source == "README.md" and not (REPO / source).exists():
            pytest.fail("README.md (pyproject's readme, needed to build the wheel) is missing")
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_containerignore_keeps_state_and_secrets_out():
    for path in (".venv/bin/python", ".git/config", ".env", "x/__pycache__/m.pyc", "a.sqlite3"):
        assert _ignored(path), f"{path} would be sent to the build"
    assert not _ignored("handler/__init__.py")


def test_build_stage_makes_a_wheel_holding_what_the_images_run(tmp_path):
    """The build stage's COPY lines and `pip wheel`, replayed in a scratch context."""
    context = tmp_path / "src"
    context.mkdir()
    copies = [arg.split() for arg in _stages()["build"].args("COPY")]
    for *sources, dest in copies:
        for source in sources:
            target = context / Path(dest.removeprefix("/src/")) if dest != "/src/" else context
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target / origin.name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.removeprefix("Requires-Dist:").strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    for needed in ("handler/__init__.py", "handler/gunicorn_conf.py", "pipelines/__main__.py"):
        assert needed in names, f"{needed} missing from the wheel"
    for schema in (REPO / "handler" / "schemas").glob("*.json"):
        assert f"handler/schemas/{schema.name}" in names, f"{schema.name} missing from the wheel"
    base = [r for r in requires if "extra ==" not in r]
    assert base and not [r for r in base if r.lower().startswith(("torch", "llama"))], base
    assert any(r.startswith("torch==") and 'extra == "train"' in r for r in requires)
