"""Start and stop a real ``llama stack run`` with the project's run.yaml on a free loopback port.

scripts/demo.py and the provider tests both use it. Every wait is bounded; when the server dies
or never answers, the error carries the tail of its log, so the caller can say why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_YAML = ROOT / "run.yaml"
LLAMA = Path(sys.executable).with_name("llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StackServer:
    """One ``llama stack run run.yaml --port N`` process; ``start()`` again after ``stop()``."""

    def __init__(self, env: dict[str, str], log_dir: Path, run_yaml: Path = RUN_YAML) -> None:
        self.env = {**os.environ, **env, "LLAMA_STACK_HOST": "127.0.0.1"}
        self.run_yaml = run_yaml
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.console_log = log_dir / "console-0.log"
        self.log_file = log_dir / "llama-stack-0.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, n: int = 60) -> str:
        text = ""
        for path in (self.console_log, self.log_file):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def start(self, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.console_log = self.log_dir / f"console-{self.starts}.log"
        self.log_file = self.log_dir / f"llama-stack-{self.starts}.log"
        self.starts += 1
        env = {**self.env, "LLAMA_STACK_LOG_FILE": str(self.log_file)}
        with self.console_log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(LLAMA), "stack", "run", str(self.run_yaml), "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama stack run exited ({self.proc.returncode}):\n{self.tail()}"
                )
            if self.healthy(timeout_s=2):
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"llama stack run not healthy after {timeout_s:.0f}s:\n{self.tail()}")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /v1/health`` answers 200."""
        import requests

        try:
            return requests.get(self.url + "/v1/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: providers shut down), SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)
