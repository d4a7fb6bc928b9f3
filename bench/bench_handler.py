"""Ingress benchmark: the handler under gunicorn vs a bare Flask app that only parses the event.

Both run under the same gunicorn config (handler/gunicorn_conf.py: same workers, threads,
access log) on 127.0.0.1; the handler uses the no-op backend (KFP_TRAINER_BACKEND=noop, so
nothing trains) over a fresh SQLite store. A bounded load generator (client processes x
threads, a fixed number of requests, new connection per request) posts binary-mode
job.requested events with unique job_uuids, alternating rounds between the two servers (each
round starts once the previous server is idle again), and prints req/s, p50 and p99 for each
and the ratio. Targets: >= 0.9x the bare app, p99 <= 20 ms
at 2 workers. The handler's backend is chosen by configuration: ``hold`` (accept, never start:
the ingress path alone) or ``noop`` (start and complete every job at once). Run by hand:

    .venv/bin/python bench/bench_handler.py [--backend hold|noop] [--requests 2000]
        [--workers 2] [--clients 2x2] [--logs DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.jobs import job_request  # noqa: E402

JOB_REQUESTED = "io.llamastack.posttraining.job.requested"


def create_bare_app() -> Any:
    """The baseline: Flask that parses the CloudEvent (same SDK binding) and answers 200."""
    from cloudevents.core.bindings.http import HTTPMessage, from_http
    from cloudevents.core.formats.json import JSONFormat
    from flask import Flask, request

    app = Flask("bare")
    fmt = JSONFormat()

    @app.post("/")
    def receive() -> tuple[str, int]:
        from_http(HTTPMessage(dict(request.headers.items()), request.get_data()), fmt)
        return "", 200

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _request_body(job_uuid: str, dataset: str) -> bytes:
    """The tests' job.requested payload (tests/support/jobs.py), as the load generator sends it."""
    return json.dumps(job_request(job_uuid, dataset)).encode()


class Server:
    """gunicorn with the project config on a socket bound here (port 0, passed as fd://)."""

    def __init__(self, app: str, env: dict[str, str], log: Path, workers: int, threads: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(REPO / "handler" / "gunicorn_conf.py"),
                "--pythonpath",
                str(REPO / "bench"),
                app,
            ],
            cwd=REPO,
            env={
                **os.environ,
                **env,
                "GUNICORN_BIND": f"fd://{fd}",
                "GUNICORN_WORKERS": str(workers),
                "GUNICORN_THREADS": str(threads),
            },
            pass_fds=(fd,),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{app} did not start; see {log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{app} not healthy within 60 s; see {log}")
            time.sleep(0.2)

    def cpu_s(self) -> float:
        """CPU seconds its worker processes have used so far (Linux /proc; 0 elsewhere)."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid:  # ppid: one of our workers
                total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
        return total / os.sysconf("SC_CLK_TCK")

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the workers are idle: work left from a round (noop: starting and
        completing the jobs it queued) must not run during the next server's round."""
        deadline = time.monotonic() + timeout
        used = self.cpu_s()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.cpu_s()
            if now - used < 0.02:
                return
            used = now

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        self.sock.close()


def _client(port: int, prefix: str, count: int, threads: int, dataset: str, out: Any) -> None:
    """One client process: ``threads`` threads sharing ``count`` requests; latencies in ms."""
    import threading

    headers_base = {
        "ce-specversion": "1.0",
        "ce-source": "/bench",
        "ce-type": JOB_REQUESTED,
        "Content-Type": "application/json",
    }
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def work() -> None:
        mine: list[float] = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            job = f"{prefix}-{i}"
            body = _request_body(job, dataset)
            headers = {**headers_base, "ce-id": job, "Content-Length": str(len(body))}
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                conn.close()
                ok = resp.status == 200
            except OSError as exc:
                ok = False
                with lock:
                    errors.append(str(exc))
            mine.append((time.perf_counter() - t0) * 1000)
            if not ok:
                with lock:
                    errors.append(f"status {resp.status}")
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    out.put((lat, errors[:5], len(errors)))


def run_load(port: int, prefix: str, requests: int, procs: int, threads: int, dataset: str):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    per = [requests // procs + (1 if i < requests % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(target=_client, args=(port, f"{prefix}-p{i}", n, threads, dataset, out))
        for i, n in enumerate(per)
    ]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    elapsed = time.perf_counter() - t0
    for w in workers:
        w.join(60)
    latencies = [x for lat, _, _ in results for x in lat]
    errors = sum(n for _, _, n in results)
    if errors:
        samples = [e for _, es, _ in results for e in es]
        raise SystemExit(f"{errors} failed requests against :{port}, e.g. {samples[:3]}")
    return len(latencies) / elapsed, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", default="2x2", help="PROCESSESxTHREADS of the load generator")
    parser.add_argument("--logs", type=Path, help="keep both servers' JSON logs in this directory")
    parser.add_argument(
        "--backend",
        default="hold",
        choices=("hold", "noop"),
        help="hold: jobs are accepted and never started (ingress only, the default); "
        "noop: every job is started and completed at once (adds the lifecycle writes)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra handler env"
    )
    args = parser.parse_args()
    procs, threads = (int(x) for x in args.clients.split("x"))

    with tempfile.TemporaryDirectory(prefix="bench-handler-") as tmp:
        base = Path(tmp)
        dataset = base / "train.jsonl"
        dataset.write_text('{"chat_completion_input": "[]", "expected_answer": "x"}\n')
        (base / "models" / "llama3.2-tiny").mkdir(parents=True)
        env = {
            "KFP_TRAINER_BACKEND": args.backend,
            "KFP_TRAINER_STATE_DIR": str(base / "state"),
            "KFP_TRAINER_MODEL_STORE": str(base / "models"),
            "KFP_TRAINER_SINK": "",
            "K_SINK": "",
            **dict(item.split("=", 1) for item in args.env),
        }
        handler = Server(
            "handler:create_app()", env, base / "handler.log", args.workers, args.threads
        )
        bare = Server(
            "bench_handler:create_bare_app()", {}, base / "bare.log", args.workers, args.threads
        )
        try:
            # Warm both (imports, schema cache, first connections).
            run_load(handler.port, "warm", 100, procs, threads, str(dataset))
            run_load(bare.port, "warm", 100, procs, threads, str(dataset))
            stats: dict[str, dict[str, list[float]]] = {
                "handler": {"rps": [], "lat": []},
                "bare": {"rps": [], "lat": []},
            }
            for r in range(args.rounds):
                for name, server in (("handler", handler), ("bare", bare)):
                    rps, lat = run_load(
                        server.port, f"r{r}", args.requests, procs, threads, str(dataset)
                    )
                    stats[name]["rps"].append(rps)
                    stats[name]["lat"].extend(lat)
                    server.settle()
        finally:
            handler.stop()
            bare.stop()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in ("handler.log", "bare.log"):
                    (args.logs / name).write_bytes((base / name).read_bytes())

    print(
        f"gunicorn workers={args.workers} threads={args.threads}; backend {args.backend}; load "
        f"{procs} processes x {threads} threads; {args.rounds} rounds x {args.requests} requests"
    )
    rows = {}
    for name in ("handler", "bare"):
        rps = statistics.median(stats[name]["rps"])
        lat = stats[name]["lat"]
        rows[name] = (rps, _pct(lat, 0.5), _pct(lat, 0.99))
        _, p50, p99 = rows[name]
        print(f"{name:8s} {rps:8.1f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    ratio = rows["handler"][0] / rows["bare"][0]
    p99 = rows["handler"][2]
    print(
        f"ratio handler/bare: {ratio:.2f}x (target >= 0.90x); "
        f"handler p99 {p99:.2f} ms (target <= 20 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
