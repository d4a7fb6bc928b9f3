"""Test helpers for handler/: request builders, a recording sink, real gunicorn on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from handler import contract

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def write_dataset(path: Path, rows: int = 8) -> Path:
    """An ``instruct`` JSONL dataset in llama-stack's row shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            question = json.dumps([{"role": "user", "content": f"What is {i} plus {i}?"}])
            f.write(
                json.dumps({"chat_completion_input": question, "expected_answer": str(2 * i)})
                + "\n"
            )
    return path


def request_data(job_uuid: str, dataset: Path, **overrides: Any) -> dict[str, Any]:
    """A valid job.requested payload for the tiny model (model resolved from the store)."""
    data: dict[str, Any] = {
        "job_uuid": job_uuid,
        "model": "llama3.2-tiny",
        "training_config": {
            "n_epochs": 1,
            "max_steps_per_epoch": 2,
            "gradient_accumulation_steps": 1,
            "data_config": {
                "dataset_id": "ds",
                "batch_size": 2,
                "shuffle": False,
                "data_format": "instruct",
            },
            "optimizer_config": {
                "optimizer_type": "adamw",
                "lr": 1e-3,
                "weight_decay": 0.0,
                "num_warmup_steps": 0,
            },
            "dtype": "fp32",
        },
        "algorithm_config": {
            "type": "LoRA",
            "lora_attn_modules": ["q_proj", "v_proj"],
            "apply_lora_to_mlp": False,
            "apply_lora_to_output": False,
            "rank": 4,
            "alpha": 8,
        },
        "hyperparam_search_config": {},
        "logger_config": {},
        "dataset": {"uri": str(dataset), "format": "jsonl"},
    }
    data.update(overrides)
    return data


def binary(event_type: str, data: Any, *, event_id: str = "e-1", subject: str | None = None):
    """Headers and body of a binary-mode request event built by hand (not via make_event)."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/tests",
        "ce-type": event_type,
        "Content-Type": "application/json",
    }
    if subject:
        headers["ce-subject"] = subject
    return headers, json.dumps(data).encode()


def requested_message(data: dict[str, Any], *, structured: bool = False):
    event = contract.make_event(contract.JOB_REQUESTED, "/tests", data)
    return contract.to_http(event, structured=structured)


def cancel_message(job_uuid: str):
    event = contract.make_event(contract.JOB_CANCEL_REQUESTED, "/tests", {"job_uuid": job_uuid})
    return contract.to_http(event)


# -- a recording sink ------------------------------------------------------------------------


class Sink:
    """A small HTTP server that records every CloudEvent POSTed to it.

    ``fail`` makes it answer 503 (to test retries); ``events`` holds structured dicts.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []
        self.fail = False
        self.attempts = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with sink._lock:
                    sink.attempts += 1
                    failing = sink.fail
                if failing:
                    self.send_response(503)
                    self.end_headers()
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = contract.from_http(headers, body)
                with sink._lock:
                    sink.raw.append((headers, body))
                    sink.events.append(contract.event_to_dict(event))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Sink:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, job_uuid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("subject") == job_uuid]

    def types(self, job_uuid: str) -> list[str]:
        return [e["type"].removeprefix(contract.PREFIX) for e in self.of(job_uuid)]


# -- gunicorn on loopback --------------------------------------------------------------------


class Gunicorn:
    """The real ``gunicorn -c handler/gunicorn_conf.py 'handler:create_app()'`` on 127.0.0.1.

    The listening socket is bound here on port 0 and handed over as ``fd://``, so there is no
    race for a port. Output (JSON logs) goes to ``log``.
    """

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 2) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        fd = self.sock.fileno()
        full_env = {
            **os.environ,
            "GUNICORN_WORKERS": str(workers),
            "GUNICORN_BIND": f"fd://{fd}",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(REPO / "handler" / "gunicorn_conf.py"),
                "handler:create_app()",
            ],
            cwd=REPO,
            env=full_env,
            pass_fds=(fd,),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early; log:\n{self.log.read_text()[-3000:]}")
            try:
                return requests.get(self.url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout, "gunicorn /readyz")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), SIGKILL if it does not stop in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        self.sock.close()
        return self.proc.returncode

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@contextmanager
def gunicorn(env: dict[str, str], log: Path, *, workers: int = 2) -> Iterator[Gunicorn]:
    server = Gunicorn(env, log, workers=workers)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def curl(*args: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Run real curl; return (status, lower-cased headers, body)."""
    proc = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"curl failed ({proc.returncode}): {proc.stderr.decode()}")
    raw = proc.stdout
    # Skip interim responses (100 Continue).
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body
