"""Directories appear whole or not at all: built beside their final place, then swapped in.

A later job (or a reader of a finished one) must never pick up a half-written checkpoint or
model, so writers fill a hidden sibling directory and rename it over the final path at the end.
What appears is readable by everyone (directories 0755, files 0644), as a shared volume needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``final``; on success it replaces ``final``, else it is removed.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_dir(root / "out") as tmp:
    ...     _ = (tmp / "f").write_text("x")
    >>> (root / "out" / "f").read_text()
    'x'
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        share_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def share_modes(root: Path) -> None:
    """Directories 0755, files 0644: a shared volume's other users can read what we publish.

    ``mkdtemp`` makes 0700 directories and safetensors writes 0600 files; neither suits a
    checkpoint that an inference server running as another user loads.
    """
    root.chmod(0o755)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


__all__ = ["share_modes", "staged_dir"]
