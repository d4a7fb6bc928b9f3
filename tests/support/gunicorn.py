"""Real gunicorn on 127.0.0.1: the listening socket is bound here and handed over as ``fd://``.

Binding port 0 here means there is no race for a port, and the URL is known before gunicorn
starts (a handler's notice URL can point at itself). Output (JSON logs) goes to a file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from tests.support import REPO
from tests.support.loopback import wait_for

# ``gunicorn -c handler/gunicorn_conf.py 'handler:create_app()'``, from the checkout.
APP_ARGV = [
    sys.executable,
    "-m",
    "gunicorn",
    "-c",
    str(REPO / "handler" / "gunicorn_conf.py"),
    "handler:create_app()",
]


class GunicornProcess:
    """One gunicorn process on a socket bound here; ``launch`` it, ``wait_ready``, ``stop``.

    ``own_session`` starts it in a session of its own, so a SIGKILL reaches its workers too;
    ``ready_path`` is the route that must answer 200 before it counts as up.
    """

    def __init__(
        self,
        log: Path,
        *,
        ready_path: str = "/readyz",
        own_session: bool = False,
        port: int = 0,
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))  # 0: a free port; else a stopped one's again
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_path = ready_path
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, argv: list[str], cwd: Path, base: dict[str, str], env: dict[str, str]):
        """Start ``argv``: environment ``base``, then the socket, then ``env`` on top."""
        fd = self.sock.fileno()
        full_env = {**base, "GUNICORN_BIND": f"fd://{fd}", "PYTHONUNBUFFERED": "1", **env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                pass_fds=(fd,),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            assert self.proc is not None, "gunicorn was never launched"
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"gunicorn exited early ({self.proc.returncode}); log:\n{self.log_tail()}"
                )
            try:
                return requests.get(self.url + self.ready_path, timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout, f"gunicorn {self.ready_path}")

    def terminate(self) -> None:
        """SIGTERM to the arbiter (graceful), as the kubelet sends it."""
        assert self.proc is not None, "gunicorn was never launched"
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL if it does not stop in time; returns the exit code."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.own_session:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait(10)
        self.sock.close()
        return None if proc is None else proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def log_lines(self) -> list[dict[str, Any]]:
        """The log's JSON records (other lines skipped)."""
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class Gunicorn(GunicornProcess):
    """The handler app under gunicorn from the checkout, started at once; ``env`` on top."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 2) -> None:
        super().__init__(log)
        self.launch(APP_ARGV, REPO, {**os.environ, "GUNICORN_WORKERS": str(workers)}, env)
