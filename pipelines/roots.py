"""Where a job request may point: the allowed roots for dataset and model URIs.

A request names files by URI, and the training task opens what it names. So the handler (at
ingress) and the train task (before it fetches anything) check every URI against a list of
roots, and refuse anything else with a message naming the URI and the roots. The check looks
at the URI alone: no file outside the roots is ever opened, not even to look at it.

- Local mode: the state dir, the model store and ``KFP_TRAINER_DATA_ROOTS``.
- Remote mode: ``s3://<S3_BUCKET>/<S3_PREFIX>``, the model store and ``KFP_TRAINER_DATA_ROOTS``.

``KFP_TRAINER_DATA_ROOTS`` is a comma-separated list of directories, ``s3://bucket/prefix`` or
``https://host/path`` prefixes. Local paths are compared after resolving symlinks and ``..``,
so neither leads out of a root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final
from urllib.parse import unquote, urlparse

# Request fields that name a file, and where their URI is.
URI_FIELDS: Final = ("dataset", "validation_dataset", "model_artifact")
_REMOTE_SCHEMES: Final = ("s3", "http", "https")


def parse_roots(raw: str) -> tuple[str, ...]:
    """``KFP_TRAINER_DATA_ROOTS`` as a tuple: comma-separated, blanks dropped."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _local(uri: str) -> str | None:
    """The resolved absolute path a local URI names, or None for s3:// and http(s)://."""
    parsed = urlparse(uri)
    if parsed.scheme in _REMOTE_SCHEMES:
        return None
    if parsed.scheme == "file":
        path = unquote(parsed.path)
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        path = uri
    else:
        return None
    # realpath reads symlinks (lstat/readlink) but opens nothing.
    return os.path.realpath(os.path.expanduser(path))


def _remote(uri: str) -> tuple[str, str, str] | None:
    """(scheme, host or bucket, path without leading slash) of an s3:// or http(s):// URI."""
    parsed = urlparse(uri)
    if parsed.scheme not in _REMOTE_SCHEMES or not parsed.netloc:
        return None
    return parsed.scheme, parsed.netloc.lower(), parsed.path.lstrip("/")


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it, segment-wise ("/data" does not contain "/database")."""
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or root == ""


@dataclass(frozen=True)
class Roots:
    """The places a request may name, as given (for messages) and normalised (for checks)."""

    entries: tuple[str, ...]

    @classmethod
    def of(cls, entries: Iterable[str]) -> Roots:
        """Roots from any mix of paths and URIs; blanks and repeats dropped, order kept."""
        seen: dict[str, None] = {}
        for entry in entries:
            entry = str(entry).strip()
            if entry:
                seen.setdefault(entry, None)
        return cls(tuple(seen))

    @classmethod
    def local(
        cls, state_dir: str | os.PathLike[str], model_store: str, data_roots: Iterable[str]
    ) -> Roots:
        """Local mode's roots: the state dir, the model store, the configured data roots."""
        return cls.of([os.fspath(state_dir), model_store, *data_roots])

    @classmethod
    def remote(cls, bucket: str, prefix: str, model_store: str, data_roots: Iterable[str]) -> Roots:
        """Remote mode's roots: the configured bucket and prefix, the model store, the
        configured data roots."""
        base = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/") if bucket else ""
        return cls.of([base, model_store, *data_roots])

    def allows(self, uri: str) -> bool:
        """True when ``uri`` lies inside one of the roots (looking at the URI alone)."""
        local = _local(uri)
        remote = None if local is not None else _remote(uri)
        if local is None and remote is None:
            return False
        if remote is not None and ".." in PurePosixPath(remote[2]).parts:
            return False  # a server may normalise "a/../b"; S3 would not: refuse both
        for root in self.entries:
            root_local = _local(root)
            if local is not None and root_local is not None:
                if _under(local, root_local):
                    return True
                continue
            root_remote = _remote(root)
            if (
                remote is not None
                and root_remote is not None
                and remote[:2] == root_remote[:2]
                and _under(remote[2], root_remote[2])
            ):
                return True
        return False

    def problem(self, field: str, uri: str) -> str | None:
        """The refusal for ``uri`` in ``field``, or None when it is allowed."""
        if self.allows(uri):
            return None
        allowed = ", ".join(self.entries) or "(none configured)"
        return (
            f"{field}: {uri!r} is outside the allowed roots ({allowed}); requests may only name "
            "files under these (add a directory or prefix to KFP_TRAINER_DATA_ROOTS to allow it)"
        )

    def request_problems(self, request: Mapping[str, Any]) -> list[str]:
        """Every URI of a job request that lies outside the roots, one problem each."""
        problems = []
        for field in URI_FIELDS:
            ref = request.get(field)
            uri = ref.get("uri") if isinstance(ref, Mapping) else None
            if isinstance(uri, str) and uri:
                problem = self.problem(f"{field}.uri", uri)
                if problem:
                    problems.append(problem)
        return problems

    def to_json(self) -> str:
        """The roots as a pipeline parameter (a JSON list)."""
        return json.dumps(list(self.entries))

    @classmethod
    def from_json(cls, text: str) -> Roots:
        """The inverse of :meth:`to_json`.

        :raises ValueError: not a JSON list of strings.
        """
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"allowed roots must be a JSON list of strings, got {text!r}")
        return cls.of(value)


__all__ = ["URI_FIELDS", "Roots", "parse_roots"]
