"""The handler's commands: ``serve`` (gunicorn with the project config) and ``send``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tests.handler.helpers import request_data
from tests.support import REPO
from tests.support.gunicorn import Gunicorn
from tests.support.loopback import free_port, wait_for


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handler.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_send_binary_and_structured(env, tmp_path, dataset):
    g = Gunicorn(env, tmp_path / "gunicorn.log")
    try:
        g.wait_ready()
        for n, mode in enumerate(([], ["--structured"])):
            path = tmp_path / f"req{n}.json"
            path.write_text(json.dumps(request_data(f"cli-{n}", dataset)))
            out = run_cli("send", "--sink", g.url + "/", "--request", str(path), *mode)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
            assert answer["status"] == 200
            assert answer["event"]["ce-type"] == "io.llamastack.posttraining.job.scheduled"
            assert answer["body"]["job_uuid"] == f"cli-{n}"
        out = run_cli("send", "--sink", g.url + "/", "--cancel", "nobody")
        assert out.returncode == 1
        assert (
            json.loads(out.stdout)["body"]["message"] == "unknown job 'nobody': nothing to cancel"
        )
    finally:
        assert g.stop() == 0


def test_send_names_a_bad_request_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run_cli("send", "--sink", "http://127.0.0.1:9/", "--request", str(bad))
    assert out.returncode != 0
    assert f"{bad} is not valid JSON" in out.stderr
    bad.write_text(json.dumps({"job_uuid": "x"}))
    out = run_cli("send", "--sink", "http://127.0.0.1:9/", "--request", str(bad))
    assert out.returncode == 2
    assert "'model' is a required property" in out.stderr


def _conf(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import runpy; ns = runpy.run_path('handler/gunicorn_conf.py');"
        "print(ns['bind'], ns['workers'], ns['threads'], ns['graceful_timeout'], ns['wsgi_app'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gunicorn_config_reads_port_workers_and_threads_from_env():
    out = _conf({"PORT": "9123", "GUNICORN_WORKERS": "3", "GUNICORN_THREADS": "4"})
    assert out.stdout.split() == ["['0.0.0.0:9123']", "3", "4", "20", "handler:create_app()"]
    out = _conf({"PORT": ""})
    assert out.stdout.split()[0] == "['0.0.0.0:8080']"
    out = _conf({"GUNICORN_WORKERS": "many"})
    assert out.returncode != 0
    assert "GUNICORN_WORKERS='many' is not an integer" in out.stderr


def test_serve_runs_gunicorn_and_stops_on_sigterm(env, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "serve", "--bind", f"127.0.0.1:{port}"],
        cwd=REPO,
        env={**os.environ, **env, "GUNICORN_WORKERS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for(up, 60, "kfp-trainer serve")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    lines = [json.loads(ln) for ln in (tmp_path / "serve.log").read_text().splitlines() if ln]
    messages = [r["msg"] for r in lines]
    assert f"Listening at: http://127.0.0.1:{port} ({proc.pid})" in messages
    assert "handler service stopped" in messages
