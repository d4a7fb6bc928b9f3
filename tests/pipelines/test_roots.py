"""pipelines.roots: which URIs a request may name, judged from the URI alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.roots import Roots, parse_roots


@pytest.fixture
def local(tmp_path: Path) -> Roots:
    (tmp_path / "state").mkdir()
    (tmp_path / "data").mkdir()
    return Roots.local(tmp_path / "state", str(tmp_path / "models"), [str(tmp_path / "data")])


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("{tmp}/state/datasets/j/train.jsonl", True),
        ("file://{tmp}/data/train.csv", True),
        ("{tmp}/models/llama3.2-tiny", True),
        ("{tmp}/data", True),
        ("{tmp}/database/train.csv", False),  # a sibling that starts with the same letters
        ("{tmp}/data/../elsewhere/train.csv", False),
        ("file:///etc/passwd", False),
        ("/etc/passwd", False),
        ("s3://bucket/train.jsonl", False),
        ("https://example.com/train.csv", False),
        ("data:text/csv;base64,YQ==", False),
    ],
)
def test_local_roots(local: Roots, tmp_path: Path, uri: str, allowed: bool) -> None:
    assert local.allows(uri.format(tmp=tmp_path)) is allowed


def test_a_symlink_out_of_a_root_is_outside(local: Roots, tmp_path: Path) -> None:
    link = tmp_path / "data" / "passwd.csv"
    os.symlink("/etc/passwd", link)
    assert not local.allows(str(link))
    assert not local.allows(f"file://{link}")


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("s3://bucket/pt/datasets/j/train.jsonl", True),
        ("s3://bucket/pt", True),
        ("s3://bucket/ptx/train.jsonl", False),
        ("s3://bucket/other/train.jsonl", False),
        ("s3://other-bucket/pt/train.jsonl", False),
        ("s3://bucket/pt/../other/train.jsonl", False),
        ("s3://shared/corpora/train.parquet", True),
        ("https://data.example.com/sets/train.csv", True),
        ("http://data.example.com/sets/train.csv", False),  # another scheme is another root
        ("https://data.example.com/other/train.csv", False),
        ("/var/data/train.csv", False),
    ],
)
def test_remote_roots(uri: str, allowed: bool) -> None:
    roots = Roots.remote(
        "bucket",
        "/pt/",
        "s3://bucket/pt/models",
        parse_roots(" s3://shared/corpora , https://data.example.com/sets,, "),
    )
    assert roots.allows(uri) is allowed


def test_an_empty_prefix_allows_the_whole_bucket() -> None:
    roots = Roots.remote("bucket", "", "", ())
    assert roots.entries == ("s3://bucket",)
    assert roots.allows("s3://bucket/any/key.jsonl")
    assert not roots.allows("s3://bucket2/key.jsonl")


def test_request_problems_name_each_uri_and_the_roots(local: Roots, tmp_path: Path) -> None:
    request = {
        "dataset": {"uri": "file:///etc/passwd"},
        "validation_dataset": {"uri": str(tmp_path / "data" / "v.jsonl")},
        "model_artifact": {"uri": "/opt/models/x"},
    }
    problems = local.request_problems(request)
    roots = f"{tmp_path / 'state'}, {tmp_path / 'models'}, {tmp_path / 'data'}"
    assert problems == [
        f"dataset.uri: 'file:///etc/passwd' is outside the allowed roots ({roots}); requests "
        "may only name files under these (add a directory or prefix to KFP_TRAINER_DATA_ROOTS "
        "to allow it)",
        f"model_artifact.uri: '/opt/models/x' is outside the allowed roots ({roots}); requests "
        "may only name files under these (add a directory or prefix to KFP_TRAINER_DATA_ROOTS "
        "to allow it)",
    ]


def test_roots_travel_as_json() -> None:
    roots = Roots.of(["/a", "s3://b/p", "/a", ""])
    assert roots.entries == ("/a", "s3://b/p")
    assert Roots.from_json(roots.to_json()) == roots
    with pytest.raises(ValueError, match="JSON list of strings"):
        Roots.from_json('{"a": 1}')
