"""torchao's "import error: No module named 'triton'" line, kept out of our output.

torchtune imports torchao, and torchao 0.8.0's ``torchao/kernel/intmm.py`` tries to import its
Triton int-mm kernels; where ``triton`` is not installed (CPU builds of torch do not ship it) it
prints that line on stdout and carries on without them. Those kernels only speed up int8
matmuls on CUDA, which LoRA training in bf16/fp32 never calls, so the line reports nothing
wrong, yet it lands amid JSON logs and command output. :func:`install` (cheap: it imports
nothing) drops exactly that line while that one module executes, and only where triton is
absent; anything else it prints passes through.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import sys
from types import ModuleType
from typing import Any

MODULE = "torchao.kernel.intmm"
NOTICE = "import error: No module named 'triton'\n"


class _QuietLoader(importlib.abc.Loader):
    """The module's own loader, with the notice taken out of what it prints."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                self._loader.exec_module(module)
        finally:
            sys.stdout.write(printed.getvalue().replace(NOTICE, "", 1))

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of MODULE, once, then steps aside."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != MODULE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Drop the notice from the next import of MODULE, where triton is not installed."""
    if MODULE in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if importlib.util.find_spec("triton") is not None:
        return  # with triton the module prints nothing, or something worth reading
    sys.meta_path.insert(0, _Finder())
