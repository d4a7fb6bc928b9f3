"""Turning a model artifact (directory, .tar or .tar.gz) into a checkpoint directory on disk.

Archives are told apart by content, not by name (a plain tar named .tar.gz is fine). Extraction
refuses members that would escape the destination (absolute paths, ``..``, links pointing
outside, device files) and names the member. Extracted models are cached by content digest,
so the next job on the same archive reuses the directory; a cache entry appears in one rename,
so a crashed extraction never leaves a half-filled entry behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Final

from pipelines import storage
from pipelines.logs import event
from pipelines.models import UnknownModelError, lookup

log = logging.getLogger(__name__)

_GZIP_MAGIC: Final = b"\x1f\x8b"
_CHUNK: Final = 1024 * 1024


class StagingError(ValueError):
    """The model artifact cannot be used; the message names the file or member and why."""


def resolve_model_uri(model: str, model_store: str) -> str:
    """Where ``model`` lives in ``model_store`` (a local dir or s3://bucket/prefix).

    Tries ``<store>/<model>`` (a directory), then ``<store>/<model>.tar``, then ``.tar.gz``; with
    a registry alias it also tries the canonical name.

    :raises StagingError: nothing found (the message lists every place tried), or the store
        refused the lookup for good (no such bucket, access denied).
    :raises storage.StorageUnavailable: the store did not answer; retry later (a
        ``ConnectionError``: transient, unlike everything above).
    """
    if not model_store:
        raise StagingError(
            f"cannot resolve model {model!r}: no model store is configured "
            "(set KFP_TRAINER_MODEL_STORE or give model_artifact.uri)"
        )
    names = [model]
    try:
        canonical = lookup(model).name
    except UnknownModelError:
        canonical = model
    if canonical != model:
        names.append(canonical)
    tried: list[str] = []
    for name in names:
        for suffix, kind in (("", "dir"), (".tar", "file"), (".tar.gz", "file")):
            uri = storage.join(model_store, name + suffix)
            tried.append(uri)
            try:
                found = storage.exists(uri)
            except storage.StorageUnavailable as exc:
                raise storage.StorageUnavailable(
                    f"cannot look up model {model!r} in model store {model_store!r}: {exc}"
                ) from None
            except storage.StorageError as exc:
                raise StagingError(
                    f"cannot look up model {model!r} in model store {model_store!r}: {exc}"
                ) from None
            if found == kind:
                return uri
    raise StagingError(
        f"model {model!r} not found in model store {model_store!r}; tried: {', '.join(tried)}"
    )


def archive_kind(path: Path) -> str:
    """``"dir"``, ``"tar.gz"`` or ``"tar"`` by content.

    :raises StagingError: the path is missing or is neither a directory nor a tar archive.
    """
    if path.is_dir():
        return "dir"
    if not path.is_file():
        raise StagingError(f"model artifact {str(path)!r} does not exist")
    with path.open("rb") as f:
        head = f.read(512)
    if head[:2] == _GZIP_MAGIC:
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if tarfile.is_tarfile(path):  # old v7 tars have no magic
        return "tar"
    raise StagingError(
        f"model artifact {str(path)!r} is neither a directory, a tar nor a tar.gz archive"
    )


def _digest_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return hashlib.sha256(ident.encode()).hexdigest()


def content_digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (path, size, mtime, inode) in the cache."""
    index = cache_dir / ".digests" / _digest_key(path)
    if index.is_file():
        known = index.read_text().strip()
        if len(known) == 64:
            return known
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(index.name + f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, index)
    return digest


def _escapes(name: str) -> bool:
    norm = posixpath.normpath(name)
    return norm == ".." or norm.startswith("../")


def check_members(tar: tarfile.TarFile, archive: Path) -> None:
    """Refuse any member that could write outside the destination.

    :raises StagingError: naming the archive, the member and the reason.
    """
    where = f"model archive {str(archive)!r}"
    for m in tar.getmembers():
        name = m.name
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise StagingError(f"{where}: member {name!r} has an absolute path")
        if _escapes(name):
            raise StagingError(f"{where}: member {name!r} escapes the destination ('..')")
        if m.ischr() or m.isblk():
            raise StagingError(f"{where}: member {name!r} is a device file")
        if m.isfifo():
            raise StagingError(f"{where}: member {name!r} is a FIFO")
        if m.issym():
            target = m.linkname
            if target.startswith("/"):
                raise StagingError(
                    f"{where}: member {name!r} is a symlink to absolute path {target!r}"
                )
            if _escapes(posixpath.join(posixpath.dirname(name), target)):
                raise StagingError(
                    f"{where}: member {name!r} is a symlink pointing outside ({target!r})"
                )
        elif m.islnk():
            target = m.linkname
            if target.startswith("/") or _escapes(target):
                raise StagingError(
                    f"{where}: member {name!r} is a hard link pointing outside ({target!r})"
                )
        elif not (m.isreg() or m.isdir()):
            raise StagingError(f"{where}: member {name!r} has unsupported type {m.type!r}")


def _extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            check_members(tar, archive)
            tar.extractall(dest, filter="data")
    except StagingError:
        raise
    except tarfile.FilterError as exc:
        raise StagingError(f"model archive {str(archive)!r}: unsafe member: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StagingError(
            f"model archive {str(archive)!r} is corrupt or truncated: {exc}"
        ) from None
    except Exception as exc:  # zlib.error and friends from a damaged gzip stream
        raise StagingError(f"model archive {str(archive)!r} cannot be read: {exc}") from None


def _model_root(extracted: Path) -> Path:
    """The checkpoint dir inside an extracted archive: itself, or its only top-level dir."""
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def stage_model(path: Path, cache_dir: Path) -> Path:
    """The checkpoint directory for a model artifact, extracting (once) if it is an archive.

    A directory is used in place. An archive is extracted into ``cache_dir/<sha256>`` unless
    that entry exists already (a cache hit, logged as ``cache: hit``).

    :raises StagingError: missing path, not an archive, hostile or corrupt archive.
    """
    path = Path(path)
    kind = archive_kind(path)
    if kind == "dir":
        event(log, "model staged", source=str(path), kind="dir", cache="none", dir=str(path))
        return path
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = content_digest(path, cache_dir)
    entry = cache_dir / digest
    if entry.is_dir():
        root = _model_root(entry)
        event(
            log,
            "model staged",
            source=str(path),
            kind=kind,
            cache="hit",
            digest=digest,
            dir=str(root),
        )
        return root
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=cache_dir))
    try:
        _extract(path, tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # lost a race only if the winner's entry is there
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    root = _model_root(entry)
    event(
        log, "model staged", source=str(path), kind=kind, cache="miss", digest=digest, dir=str(root)
    )
    return root


__all__ = [
    "StagingError",
    "archive_kind",
    "check_members",
    "content_digest",
    "resolve_model_uri",
    "stage_model",
]
