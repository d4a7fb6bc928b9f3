"""setuptools' ``build_py`` that also puts startup_logs.pth at the root of the wheel.

Python runs a ``.pth`` file only from the root of site-packages, and setuptools installs
packages, not loose files there; the editable install (``pip install -e``, ``make install``)
builds no wheel tree, so there the file goes straight to the install's root. pyproject.toml
names this class in ``[tool.setuptools.cmdclass]``; it runs at build time only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py as _build_py

PTH = Path(__file__).with_name("startup_logs.pth")
INSTALLED_AS = "llama_stack_provider_kfp_trainer.pth"


class BuildPy(_build_py):
    def run(self) -> None:
        super().run()
        root = self.build_lib
        if self.editable_mode:
            root = self.distribution.get_command_obj("install").install_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PTH, Path(root, INSTALLED_AS))
