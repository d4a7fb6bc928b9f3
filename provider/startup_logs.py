"""llama-stack's start-up lines in the one JSON format too, when ``KFP_TRAINER_LOG_FORMAT=json``
is set in the server's environment.

llama-stack 0.2.12 sets up its (rich) console and file handlers when ``llama_stack.log`` is
first imported, and writes its CLI's lines, the run configuration and the providers.d loading,
and pydantic prints a warning about its StackRunConfig, all before it imports any provider:
:mod:`provider.logs` cannot reach those lines. Python runs the project's ``.pth`` file
(startup_logs.pth, installed at the root of site-packages) at interpreter start; with the
variable set to ``json`` it imports this module, which only puts a finder in front of
``sys.meta_path`` and otherwise waits. When a process first imports ``llama_stack``, Python
warnings become records on a JSON handler on the root logger; once ``llama_stack.log`` has run
its logging set-up, :func:`provider.logs.json_everywhere` replaces its handlers' format, as the
provider does at its start. Processes that never import llama-stack (pip, the handler, KFP's
task processes) are left as they are; with the variable unset or ``text``, nothing is imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


class _LlamaStackLogging(importlib.abc.MetaPathFinder):
    """Finds nothing itself: sees ``llama_stack`` and ``llama_stack.log`` being imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "llama_stack":
            _warnings_as_json()
        elif fullname == "llama_stack.log":
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                _then_json(spec.loader)
            return spec
        return None


def _then_json(loader: Any) -> None:
    """This one loader (its own instance, made for ``llama_stack.log``) runs the module, then
    makes every handler it configured JSON. What the module prints to stderr outside logging
    (with ``LLAMA_STACK_LOGGING`` set, termcolor's "Environment variable ... found" line)
    becomes a warning record: llama-stack shows that line whatever the levels."""
    run = loader.exec_module

    def exec_module(module: ModuleType) -> None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                run(module)
        except BaseException:
            sys.stderr.write(printed.getvalue())
            raise
        from pipelines.logs import JsonLineStream
        from provider.logs import json_everywhere

        json_everywhere()
        as_records = JsonLineStream(sys.stdout, logging.getLogger(module.__name__), logging.WARNING)
        as_records.write(printed.getvalue())
        as_records.flush()

    loader.exec_module = exec_module


def _warnings_as_json() -> None:
    """Python warnings as records, on a JSON handler on the root logger until llama-stack's
    logging set-up replaces the root's handlers (pydantic warns while llama-stack imports)."""
    from pipelines.logs import json_handler

    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(json_handler(sys.stdout))
    logging.captureWarnings(True)


def install() -> None:
    """Watch for llama-stack's first imports (nothing to watch once it is imported)."""
    if "llama_stack" not in sys.modules:
        sys.meta_path.insert(0, _LlamaStackLogging())


install()
