"""torchao's "No module named 'triton'" line stays out of our output; nothing else is dropped."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys

from pipelines import torchao_notice
from tests.support import REPO

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_torchao_prints_the_notice_where_triton_is_missing():
    """The line is real here (so the next test can fail): plain torchao prints it."""
    proc = _python("import torchao")
    assert proc.returncode == 0, proc.stderr
    assert (torchao_notice.NOTICE in proc.stdout) is not HAS_TRITON, proc.stdout


def test_torchtune_imported_after_pipelines_prints_nothing():
    proc = _python(
        "import pipelines, torchtune, torchao.kernel.intmm as m\n"
        "print('kernels', m.intmm_triton is not None)\n"
        "print('source', len(__import__('inspect').getsource(m.safe_int_mm)) > 0)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"kernels {HAS_TRITON}\nsource True\n"
    assert "triton" not in proc.stderr


def test_only_the_notice_is_dropped(tmp_path, capsys):
    noisy = tmp_path / "noisy.py"
    noisy.write_text(f"print({torchao_notice.NOTICE.rstrip()!r})\nprint('worth reading')\nX = 1\n")
    loader = importlib.machinery.SourceFileLoader("noisy", str(noisy))
    spec = importlib.util.spec_from_loader("noisy", torchao_notice._QuietLoader(loader))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.X == 1
    assert capsys.readouterr().out == "worth reading\n"
