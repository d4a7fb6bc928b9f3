"""Directories appear whole or not at all: built beside their final place, then swapped in.

A later job (or a reader of a finished one) must never pick up a half-written checkpoint or
model, so writers fill a hidden sibling directory and rename it over the final path at the end.
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["staged_dir"]
