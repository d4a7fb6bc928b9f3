"""Ingress benchmark: the handler under gunicorn vs bare Flask apps, local mode and remote mode.

Part one (``--part local``), local mode. Every app runs under the same gunicorn config
(handler/gunicorn_conf.py: same workers, threads, access log) on 127.0.0.1, in one run:

- ``bare``: Flask that parses the CloudEvent with the SDK and answers 200 (the baseline);
- ``checks``: bare plus the handler's own checks (contract schema, ``check_request``), answering
  200 with no reply and storing nothing: the floor of any handler that validates on ingress;
- ``floor``: a bare Flask app doing the handler's ingress checks (the same ``ingress.decode``
  and ``Admission.check``) and one durable INSERT per accepted request (SQLite, WAL,
  ``synchronous=NORMAL``, as the handler's store): the same work, without the handler around it;
- ``floor-reply``: the floor plus only the 200 ``job.scheduled`` reply event the design requires
  (the contract's event, in binary mode, as the Broker routes it): what the floor leaves out that
  no handler may, so ``handler / floor-reply`` is the cost of the handler around the work;
- ``handler``: the real app (``KFP_TRAINER_DB_SYNC=normal``, the default) over a fresh store;
- ``handler-full``: the same with ``KFP_TRAINER_DB_SYNC=full`` (an fsync per accepted request);
- ``handler-auth``: the handler with identity checks on (``KFP_TRAINER_AUTH=true``) against the
  Kubernetes API stand-in (tests/k8s_standin); every request carries the same token, so after a
  worker's first TokenReview its answer comes from the cache: the steady cost of the checks.
- ``handler-traced``: the handler with tracing on, exporting every span over OTLP/HTTP to the
  tests' receiver stand-in (tests/support/otlp.py) in this process; each request carries a
  ``ce-traceparent``, as the provider's do.

The handler's backend is chosen by configuration: ``hold`` (accept, never start: the ingress
path alone, the default) or ``noop`` (start and complete every job at once). A bounded load
generator (client processes x threads, a fixed number of requests) posts binary-mode
job.requested events with unique job_uuids, rounds alternating between the apps (each round
starts once the previous app is idle again). It prints req/s, p50, p99 and worker CPU per
request for each, and each one's ratio to ``bare``. Targets (issue 3): handler
>= 0.9x bare, p99 <= 20 ms at 2 workers; (issue 11) handler >= 0.9x floor; (issue 13)
handler-traced >= 0.9x handler.

Connections (``--connections``): every app and baseline is measured in both modes in one run,
each against its baseline in the same mode. ``per-request``: a new TCP connection per request.
``kept-alive``: each client thread keeps one connection per port and reuses it until the
server closes it, as Knative's queue-proxy (a Go reverse proxy pooling keep-alive connections
to the user container) does in the deployment. What the server does with it depends on its
worker: gunicorn's sync workers (``GUNICORN_THREADS`` 1, the local part's and ``kfp-trainer
serve``'s default) close every connection after its answer whatever the client asks, so there
kept-alive is a reconnect per request (``conns/req`` 1.00); gthread workers (threads > 1, the
remote part, which takes workers and threads from knative/config.yaml as deployed) keep it
for ``keepalive`` (5 s, handler/gunicorn_conf.py). ``conns/req`` is connections the clients
opened per request.

Part two (``--part remote``), remote mode: the latency the stateless handler adds on top of the
KFP stand-in's ``create_run``. The stand-in accepts runs and never starts them
(``Simulation(train_s=None)``); ``create_run`` is the same request body the handler sends
(the compiled pipeline and the job's parameters), POSTed straight to the stand-in with the same
load; ``handler`` is one gunicorn (``GUNICORN_WORKERS`` x ``GUNICORN_THREADS`` read from
knative/config.yaml), ``handler x3`` three of them, requests spread round-robin; ``kfp-floor``
(and ``x3``) is the remote floor under the same gunicorn: the same decode, checks and KFP calls
(``KfpRuns.create``: find, create, the converging find) with no reply event, metrics, logs or
spans, so ``handler - kfp-floor`` is what the handler adds around the KFP calls it must make.
A fresh stand-in per configuration keeps its run list the same length for each, and between
measurements what it stores is frozen out of the garbage collector's view (``_freeze_standin``: a
Python stand-in's full collections, not KFP, would otherwise set both p99s). Each configuration is
measured at two loads in the same run: the concurrent one (``--clients``; on 2 cores it saturates
them, so "added" is mostly queueing behind the CPU a request costs) and one client at a time (the
time the handler itself adds). Targets (issue 11): at most 5 ms added at p50, p99 at most 20 ms.
Run by hand:

    .venv/bin/python bench/bench_handler.py [--part local|remote|both] [--backend hold|noop]
        [--requests 2000] [--remote-requests 400] [--workers 2] [--threads 1] [--clients 2x2]
        [--logs DIR] [--apps handler,handler-traced]
        [--connections both|per-request|kept-alive]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handler.remote.transport import Connections  # noqa: E402
from tests.k8s_standin import KubeApiStandin  # noqa: E402
from tests.support.jobs import job_request  # noqa: E402
from tests.support.otlp import OtlpReceiver  # noqa: E402

JOB_REQUESTED = "io.llamastack.posttraining.job.requested"


def _app(name: str, receive: Callable[[], tuple[str, int]]) -> Any:
    from flask import Flask

    app = Flask(name)
    app.add_url_rule("/", "receive", receive, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"})
    return app


def create_bare_app() -> Any:
    """The baseline: Flask that parses the CloudEvent (same SDK binding) and answers 200."""
    from cloudevents.core.bindings.http import HTTPMessage, from_http
    from cloudevents.core.formats.json import JSONFormat
    from flask import request

    fmt = JSONFormat()

    def receive() -> tuple[str, int]:
        from_http(HTTPMessage(dict(request.headers.items()), request.get_data()), fmt)
        return "", 200

    return _app("bare", receive)


def create_checks_app() -> Any:
    """bare plus the handler's ingress checks (schema, pipeline limits); no store, no reply."""
    from cloudevents.core.bindings.http import HTTPMessage, from_http
    from flask import request

    from handler import contract
    from pipelines.validation import check_request

    def receive() -> tuple[str, int]:
        message = HTTPMessage(dict(request.headers.items()), request.get_data())
        event = contract.parse_event(from_http(message, contract.JSON_FORMAT))
        problems = check_request(event.data)
        return ("; ".join(problems), 400) if problems else ("", 200)

    return _app("checks", receive)


def make_floor_db(path: Path) -> None:
    """The floor's database, made before its server starts: two workers racing to switch a new
    file to WAL at their first connection can fail a request, which the handler's store (made
    once, by the master) never does."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE jobs (job_uuid TEXT PRIMARY KEY, request TEXT NOT NULL)")


def create_floor_app(reply: bool = False) -> Any:
    """The same work as the local handler's ingress, nothing around it: the handler's checks and
    one durable INSERT (``BENCH_FLOOR_DB``, made by :func:`make_floor_db`; synchronous=NORMAL),
    then an empty 200; with ``reply``, the 200 carries the job.scheduled event instead."""
    import threading

    from cloudevents.core.bindings.http import HTTPMessage
    from flask import request

    from handler import contract, ingress
    from handler.admission import Admission
    from handler.reply import event_reply, flask_response
    from handler.settings import HandlerSettings
    from handler.store import new_job

    settings = HandlerSettings.from_env()
    admission = Admission(settings)
    path = os.environ["BENCH_FLOOR_DB"]
    local = threading.local()

    def connection() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            local.conn = conn
        return conn

    def receive() -> Any:
        message = HTTPMessage(dict(request.headers.items()), request.get_data())
        try:
            event = ingress.decode(message, max_body_bytes=1024 * 1024)
            admission.check(event.data)
        except ValueError as exc:  # the handler's BadRequest and ContractError are ValueErrors
            return str(exc), 400
        connection().execute(
            "INSERT INTO jobs VALUES (?, ?) ON CONFLICT DO NOTHING",
            (event.data["job_uuid"], json.dumps(event.data)),
        )
        if not reply:
            return "", 200
        now = datetime.now(UTC)
        job = new_job(
            job_uuid=event.data["job_uuid"],
            digest="",
            request=event.data,
            scheduled_at=contract.timestamp(now) or "",
        )
        scheduled = contract.make_event(
            contract.JOB_SCHEDULED, settings.source, job.to_status(), time=now
        )
        return flask_response(event_reply(scheduled))

    return _app("floor-reply" if reply else "floor", receive)


def create_remote_floor_app() -> Any:
    """The remote handler's work on a new job, nothing around it: decode, the same checks, the
    same KFP calls (find, create, the converging find: ``KfpRuns.create``), then an empty 200.
    No reply event, metrics, logs or spans."""
    from cloudevents.core.bindings.http import HTTPMessage
    from flask import request

    from handler import ingress
    from handler.admission import Admission
    from handler.remote import s3
    from handler.remote.runs import KfpRuns
    from handler.settings import HandlerSettings

    settings = HandlerSettings.from_env()
    admission = Admission(settings, default_model_store=s3.model_store(settings.remote))
    runs = KfpRuns(settings)

    def receive() -> tuple[str, int]:
        message = HTTPMessage(dict(request.headers.items()), request.get_data())
        try:
            event = ingress.decode(message, max_body_bytes=settings.max_body_bytes)
            admission.check(event.data)
            resolved = admission.resolve(event.data)
        except ValueError as exc:  # the handler's BadRequest and ContractError are ValueErrors
            return str(exc), 400
        runs.create(resolved, ingress.digest(event.data))
        return "", 200

    return _app("kfp-floor", receive)


def _request_body(job_uuid: str, dataset: str) -> bytes:
    """The tests' job.requested payload (tests/support/jobs.py), as the load generator sends it.

    ``dataset`` may be ``<dataset uri> <model uri>``: the request then names its model artifact
    (remote mode: nothing to look up in the model store).
    """
    dataset, _, model = dataset.partition(" ")
    data = job_request(job_uuid, dataset)
    if model:
        data["model_artifact"] = {"uri": model}
    return json.dumps(data).encode()


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


REQUESTER = ("kfp-trainer", "kfp-trainer-job-requested-oidc-eventing.knative.dev-trigger")


def _auth_env(api: KubeApiStandin, base: Path) -> dict[str, str]:
    """The handler's identity settings against ``api``; only REQUESTER may request jobs."""
    api.grant_token_review("system:serviceaccount:kfp-trainer:kfp-trainer-handler")
    token_file = base / "handler-token"
    token_file.write_text(api.service_account_token("kfp-trainer", "kfp-trainer-handler"))
    return {
        "KFP_TRAINER_AUTH": "true",
        "KFP_TRAINER_AUTH_API_URL": api.url,
        "KFP_TRAINER_AUTH_TOKEN_PATH": str(token_file),
        "KFP_TRAINER_AUTH_CA_PATH": str(api.ca_file),
        "KFP_TRAINER_AUTH_REQUESTERS": f"system:serviceaccount:{REQUESTER[0]}:{REQUESTER[1]}",
    }


class _CountedConnections(Connections):
    """The handler's own keep-alive connections (one per thread), counting those it opens."""

    opened = 0

    def _new(self) -> http.client.HTTPConnection:
        conn = super()._new()
        with self._lock:
            self.opened += 1
        return conn


def _client(
    ports: list[int],
    prefix: str,
    count: int,
    threads: int,
    dataset: str,
    token: str,
    out: Any,
    create_run: bytes | None = None,
    keep_alive: bool = False,
) -> None:
    """One client process: ``threads`` threads sharing ``count`` requests, round-robin over
    ``ports``; latencies in ms. ``create_run``: POST that KFP run body (its display name made
    unique) to /apis/v2beta1/runs instead of a job.requested event. ``keep_alive``: each thread
    keeps one connection per port open and reuses it until the server closes it (as Knative's
    queue-proxy does); otherwise a new connection per request."""
    import threading

    pools = {port: _CountedConnections(f"http://127.0.0.1:{port}", timeout_s=30) for port in ports}

    headers_base = {
        "ce-specversion": "1.0",
        "ce-source": "/bench",
        "ce-type": JOB_REQUESTED,
        "ce-traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",  # only handler-auth reads it
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
            port = ports[i % len(ports)]
            if create_run is None:
                path, body = "/", _request_body(job, dataset)
                headers = {**headers_base, "ce-id": job, "Content-Length": str(len(body))}
            else:
                path = "/apis/v2beta1/runs"
                body = create_run.replace(
                    b'"display_name":"bench"', f'"display_name":"{job}"'.encode()
                )
                headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            t0 = time.perf_counter()
            try:
                if keep_alive:
                    status = pools[port].send("POST", path, body, headers).status
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("POST", path, body=body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    conn.close()
                    status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                status = 0
                with lock:
                    errors.append(repr(exc))
            mine.append((time.perf_counter() - t0) * 1000)
            if status not in (0, 200):
                with lock:
                    errors.append(f"status {status}")
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    opened = sum(p.opened for p in pools.values()) if keep_alive else len(lat)
    for pool in pools.values():
        pool.close()
    out.put((lat, errors[:5], len(errors), opened))


class Load(NamedTuple):
    rps: float
    latencies: list[float]  # ms, one per request
    connections: int  # opened by the clients


# How the load generator connects: a new connection per request, or one per client thread and
# port kept alive (Knative's queue-proxy). Each is measured against its own baseline.
CONNECTIONS = {"per-request": False, "kept-alive": True}


def run_load(
    port: int | list[int],
    prefix: str,
    requests: int,
    procs: int,
    threads: int,
    dataset: str,
    token: str = "",
    create_run: bytes | None = None,
    keep_alive: bool = False,
) -> Load:
    ports = port if isinstance(port, list) else [port]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    per = [requests // procs + (1 if i < requests % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_client,
            args=(ports, f"{prefix}-p{i}", n, threads, dataset, token, out, create_run, keep_alive),
        )
        for i, n in enumerate(per)
    ]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    elapsed = time.perf_counter() - t0
    for w in workers:
        w.join(60)
    latencies = [x for lat, _, _, _ in results for x in lat]
    errors = sum(n for _, _, n, _ in results)
    if errors:
        samples = [e for _, es, _, _ in results for e in es]
        raise SystemExit(f"{errors} failed requests against {ports}, e.g. {samples[:3]}")
    return Load(len(latencies) / elapsed, latencies, sum(o for *_, o in results))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=2, help="local part (kfp-trainer serve's default)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="local part (1: sync workers, serve's default)"
    )
    parser.add_argument(
        "--connections",
        default="both",
        choices=(*CONNECTIONS, "both"),
        help="new connection per request, kept alive per client thread, or both (the default)",
    )
    parser.add_argument("--clients", default="2x2", help="PROCESSESxTHREADS of the load generator")
    parser.add_argument("--logs", type=Path, help="keep every server's JSON log in this directory")
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
    parser.add_argument("--apps", help="comma-separated subset to run (bare is always run)")
    parser.add_argument("--part", default="both", choices=("local", "remote", "both"))
    parser.add_argument(
        "--remote-requests", type=int, default=400, help="remote part: per configuration per round"
    )
    args = parser.parse_args()
    procs, threads = (int(x) for x in args.clients.split("x"))
    args.modes = list(CONNECTIONS) if args.connections == "both" else [args.connections]
    if args.part in ("local", "both"):
        local_part(args, procs, threads)
    if args.part in ("remote", "both"):
        remote_part(args, procs, threads)
    return 0


def local_part(args: argparse.Namespace, procs: int, threads: int) -> None:
    """Local mode's ingress against the bare apps and the same-work floor, in one run."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-handler-") as tmp,
        KubeApiStandin(Path(tmp) / "kube-api") as api,
        OtlpReceiver() as otlp,
    ):
        base = Path(tmp)
        token = api.service_account_token(*REQUESTER, audiences=["kfp-trainer-handler"])
        dataset = base / "train.jsonl"
        dataset.write_text('{"chat_completion_input": "[]", "expected_answer": "x"}\n')
        (base / "models" / "llama3.2-tiny").mkdir(parents=True)
        env = {
            "KFP_TRAINER_BACKEND": args.backend,
            "KFP_TRAINER_STATE_DIR": str(base / "state"),
            "KFP_TRAINER_MODEL_STORE": str(base / "models"),
            "KFP_TRAINER_DATA_ROOTS": str(base),  # the dataset lies outside the state dir
            "KFP_TRAINER_SINK": "",
            "K_SINK": "",
            **dict(item.split("=", 1) for item in args.env),
        }
        apps = {
            "bare": ("bench_handler:create_bare_app()", {}),
            "checks": ("bench_handler:create_checks_app()", {}),
            "floor": (
                "bench_handler:create_floor_app()",
                {**env, "BENCH_FLOOR_DB": str(base / "floor.sqlite3")},
            ),
            "floor-reply": (
                "bench_handler:create_floor_app(reply=True)",
                {**env, "BENCH_FLOOR_DB": str(base / "floor-reply.sqlite3")},
            ),
            "handler": ("handler:create_app()", {**env, "KFP_TRAINER_DB_SYNC": "normal"}),
            "handler-full": (
                "handler:create_app()",
                {**env, "KFP_TRAINER_DB_SYNC": "full", "KFP_TRAINER_STATE_DIR": str(base / "full")},
            ),
            "handler-auth": (
                "handler:create_app()",
                {**env, **_auth_env(api, base), "KFP_TRAINER_STATE_DIR": str(base / "auth")},
            ),
            "handler-traced": (
                "handler:create_app()",
                {
                    **env,
                    "KFP_TRAINER_STATE_DIR": str(base / "traced"),
                    "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
                },
            ),
        }
        if args.apps:
            wanted = {"bare", *args.apps.split(",")}
            apps = {name: app for name, app in apps.items() if name in wanted}
        servers: dict[str, Server] = {}
        stats = {
            (name, mode): {"rps": [], "lat": [], "cpu": [], "conns": 0}
            for mode in args.modes
            for name in apps
        }
        try:
            for name, (app, app_env) in apps.items():
                if "BENCH_FLOOR_DB" in app_env:
                    make_floor_db(Path(app_env["BENCH_FLOOR_DB"]))
                servers[name] = Server(
                    app, app_env, base / f"{name}.log", args.workers, args.threads
                )
            for server in servers.values():  # warm: imports, schema cache, connections
                run_load(server.port, "warm", 100, procs, threads, str(dataset), token)
                server.settle()
            for r in range(args.rounds):
                for mode in args.modes:
                    for name, server in servers.items():
                        cpu = server.cpu_s()
                        load = run_load(
                            server.port,
                            f"r{r}{mode[0]}",
                            args.requests,
                            procs,
                            threads,
                            str(dataset),
                            token,
                            keep_alive=CONNECTIONS[mode],
                        )
                        st = stats[name, mode]
                        st["cpu"].append((server.cpu_s() - cpu) / args.requests * 1e6)
                        st["rps"].append(load.rps)
                        st["lat"].extend(load.latencies)
                        st["conns"] += load.connections
                        server.settle()
        finally:
            reviewed = len(api.reviews)
            for server in servers.values():
                server.stop()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in servers:
                    log = f"{name}.log"
                    (args.logs / log).write_bytes((base / log).read_bytes())

    kind = "sync: every answer closes its connection" if args.threads == 1 else "gthread"
    print(
        f"gunicorn workers={args.workers} threads={args.threads} ({kind})"
        f"; backend {args.backend}; load {procs} processes x {threads} threads; "
        f"{args.rounds} rounds x {args.requests} requests per connection mode"
    )
    for mode in args.modes:
        _local_table(stats, mode, args, reviewed, len(otlp.received()))


def _local_table(
    stats: dict[tuple[str, str], dict[str, Any]],
    mode: str,
    args: argparse.Namespace,
    reviewed: int,
    spans: int,
) -> None:
    """One connection mode's figures; every ratio is against apps measured in that mode."""
    names = [name for name, m in stats if m == mode]
    rps = {name: statistics.median(stats[name, mode]["rps"]) for name in names}
    print(f"\n[local, connections {mode}]")
    print(
        f"{'app':15s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'cpu us/req':>10s} "
        f"{'conns/req':>9s} {'ratio':>6s}"
    )
    for name in names:
        st = stats[name, mode]
        print(
            f"{name:15s} {rps[name]:8.1f} {_pct(st['lat'], 0.5):7.2f} {_pct(st['lat'], 0.99):7.2f} "
            f"{statistics.median(st['cpu']):10.0f} {st['conns'] / len(st['lat']):9.2f} "
            f"{rps[name] / rps['bare']:5.2f}x"
        )
    if "handler-auth" in rps and "handler" in rps:
        print(
            f"handler-auth: {rps['handler-auth'] / rps['handler']:.2f}x handler; {reviewed} "
            f"TokenReviews in the run, all modes ({args.workers} workers)"
        )
    if "handler" in rps:
        p99 = _pct(stats["handler", mode]["lat"], 0.99)
        print(
            f"targets ({mode}): handler >= 0.90x bare (got {rps['handler'] / rps['bare']:.2f}x), "
            f"p99 <= 20 ms (got {p99:.2f} ms)"
        )
    if "handler" in rps and "floor" in rps:
        print(
            f"target ({mode}): handler >= 0.90x floor (the same checks and one insert; got "
            f"{rps['handler'] / rps['floor']:.2f}x)"
        )
    if "handler" in rps and "floor-reply" in rps and "floor" in rps:
        print(
            f"floor-reply ({mode}): the floor plus only the required job.scheduled reply is "
            f"{rps['floor-reply'] / rps['floor']:.2f}x floor; handler is "
            f"{rps['handler'] / rps['floor-reply']:.2f}x floor-reply"
        )
    if "handler" in rps and "handler-traced" in rps:
        print(
            f"tracing ({mode}): handler-traced >= 0.90x handler (got "
            f"{rps['handler-traced'] / rps['handler']:.2f}x; {spans} spans received in the run)"
        )


def _run_body(runs: Any, job_uuid: str, dataset: str) -> bytes:
    """The create_run body the handler sends for a job (display name "bench", to be replaced)."""
    from handler import ingress
    from handler.remote.kfp import run_body

    request = json.loads(_request_body(job_uuid, dataset))
    return run_body(
        runs._experiment_id(),
        "bench",
        runs.pipeline_spec_json(),
        runs.arguments(request, ingress.digest(request)),
    )


@dataclass
class _Measured:
    """What the remote part measured for one (label, load, connection mode), over its rounds."""

    latencies: list[float] = field(default_factory=list)
    rps: float = 0.0  # the best round's
    connections: int = 0
    app_cpu_s: float = 0.0  # the measured app's gunicorn workers
    standin_cpu_s: float = 0.0  # the KFP stand-in's threads (this process)

    def add(self, load: Load, app_cpu_s: float, standin_cpu_s: float) -> None:
        self.latencies.extend(load.latencies)
        self.rps = max(self.rps, load.rps)
        self.connections += load.connections
        self.app_cpu_s += app_cpu_s
        self.standin_cpu_s += standin_cpu_s

    def per_request_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / len(self.latencies)


def remote_part(args: argparse.Namespace, procs: int, threads: int) -> None:
    """Remote mode: latency on top of the KFP stand-in's create_run, one and three replicas."""
    from handler.remote.runs import KfpRuns
    from handler.settings import HandlerSettings
    from tests.kfp_standin import KfpStandin, Simulation

    workers, gthreads = _deployed_gunicorn()
    measured: dict[tuple[str, str, str], _Measured] = {}  # by (label, load, mode)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        base = Path(tmp)
        dataset = "s3://bench/pt/datasets/train.jsonl s3://bench/pt/models/llama3.2-tiny.tar"
        for replicas in (1, 3):
            with KfpStandin(
                token=None, work_dir=base / f"kfp-{replicas}", simulate=Simulation(train_s=None)
            ) as standin:
                env = {
                    "KFP_TRAINER_MODE": "remote",
                    "KFP_HOST": standin.url,
                    "KFP_EXPERIMENT": "bench",
                    "S3_BUCKET": "bench",
                    "S3_PREFIX": "pt",
                    "S3_ENDPOINT_URL": "http://127.0.0.1:9",  # never asked: artifacts given
                    "K_SINK": "http://127.0.0.1:9/",
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                    "KFP_TRAINER_LOG_LEVEL": "WARNING",
                }
                runs = KfpRuns(HandlerSettings.from_env(env))
                body = _run_body(runs, "bench", dataset)
                servers, floors = (
                    [
                        Server(app, env, base / f"{kind}-{replicas}-{i}.log", workers, gthreads)
                        for i in range(replicas)
                    ]
                    for kind, app in (
                        ("remote", "handler:create_app()"),
                        ("kfp-floor", "bench_handler:create_remote_floor_app()"),
                    )
                )
                ports = [s.port for s in servers]
                floor_ports = [s.port for s in floors]
                try:
                    run_load(standin.port, "warm-c", 50, procs, threads, dataset, create_run=body)
                    run_load(ports, "warm-h", 50 * replicas, procs, threads, dataset)
                    run_load(floor_ports, "warm-f", 50 * replicas, procs, threads, dataset)
                    name = "handler" if replicas == 1 else "handler x3"
                    floor_name = "kfp-floor" if replicas == 1 else "kfp-floor x3"
                    for r in range(args.rounds):
                        for load_name, (lp, lt) in _loads(procs, threads).items():
                            for mode in args.modes:
                                for label, target, extra, apps in (
                                    (f"create_run ({replicas})", standin.port, body, []),
                                    (floor_name, floor_ports, None, floors),
                                    (name, ports, None, servers),
                                ):
                                    _freeze_standin()
                                    app_cpu = sum(s.cpu_s() for s in apps)
                                    # this process's CPU: the KFP stand-in's threads (the
                                    # load generator runs in child processes)
                                    standin_cpu = time.process_time()
                                    load = run_load(
                                        target,
                                        f"{label[:6]}-{load_name[:3]}-{mode[0]}-r{r}",
                                        args.remote_requests,
                                        lp,
                                        lt,
                                        dataset,
                                        create_run=extra,
                                        keep_alive=CONNECTIONS[mode],
                                    )
                                    measured.setdefault((label, load_name, mode), _Measured()).add(
                                        load,
                                        sum(s.cpu_s() for s in apps) - app_cpu,
                                        time.process_time() - standin_cpu,
                                    )
                finally:
                    for server in servers + floors:
                        server.stop()
    _remote_table(measured, args, procs, threads, workers, gthreads)


def _remote_table(
    measured: dict[tuple[str, str, str], _Measured],
    args: argparse.Namespace,
    procs: int,
    threads: int,
    workers: int,
    gthreads: int,
) -> None:
    print(
        f"\nremote: {workers} workers x {gthreads} threads per replica (knative/config.yaml); "
        f"{args.rounds} rounds x {args.remote_requests} requests per configuration, load and "
        "connection mode; loads: "
        + ", ".join(
            f"{k} = {p} processes x {t} threads" for k, (p, t) in _loads(procs, threads).items()
        )
    )
    for mode in args.modes:
        print(f"\n[remote, connections {mode}]")
        print(
            f"{'':16s} {'load':>10s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
            f"{'app us CPU/req':>18s} {'stand-in us CPU/req':>19s} {'conns/req':>9s}"
        )
        for (label, load_name, m), got in measured.items():
            if m != mode:
                continue
            lat = got.latencies
            print(
                f"{label:16s} {load_name:>10s} {got.rps:8.1f} {_pct(lat, 0.5):7.2f} "
                f"{_pct(lat, 0.99):7.2f} {got.per_request_us(got.app_cpu_s):18.0f} "
                f"{got.per_request_us(got.standin_cpu_s):19.0f} {got.connections / len(lat):9.2f}"
            )
        for replicas, suffix in ((1, ""), (3, " x3")):
            for load_name in _loads(procs, threads):
                base_lat = measured[f"create_run ({replicas})", load_name, mode].latencies
                for name in (f"kfp-floor{suffix}", f"handler{suffix}"):
                    lat = measured[name, load_name, mode].latencies
                    p50 = _pct(lat, 0.5) - _pct(base_lat, 0.5)
                    p99 = _pct(lat, 0.99) - _pct(base_lat, 0.99)
                    print(
                        f"{name} ({load_name}, {mode}): adds {p50:.2f} ms at p50, {p99:.2f} ms "
                        f"at p99 on top of create_run; p99 {_pct(lat, 0.99):.2f} ms (targets, "
                        "handler: <= 5 ms added at p50, p99 <= 20 ms)"
                    )


def _deployed_gunicorn() -> tuple[int, int]:
    """GUNICORN_WORKERS and GUNICORN_THREADS as knative/config.yaml deploys the remote handler
    (threads > 1: gthread workers, which keep connections alive)."""
    import yaml

    config = yaml.safe_load((REPO / "knative" / "config.yaml").read_text())["data"]
    return int(config["GUNICORN_WORKERS"]), int(config["GUNICORN_THREADS"])


def _freeze_standin() -> None:
    """Between measurements: collect, then move what this process holds (the stand-in's runs,
    which grow by one per request) out of the garbage collector's view. Otherwise a full
    collection of thousands of stored runs stops the stand-in for 45-90 ms, which is how a
    Python stand-in stalls, not how KFP's Go server does, and shows as those requests' p99."""
    gc.collect()
    gc.freeze()


def _loads(procs: int, threads: int) -> dict[str, tuple[int, int]]:
    """The remote part's loads: the concurrent one (``--clients``), where the two cores are
    saturated and added latency is mostly queueing behind the extra CPU a request costs, and
    one client at a time, where it is the time the handler itself adds."""
    return {"concurrent": (procs, threads), "sequential": (1, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
