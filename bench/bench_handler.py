"""Ingress benchmark: the handler under gunicorn vs bare Flask apps, local mode and remote mode.

Part one (``--part local``), local mode. Every app runs under the same gunicorn config
(handler/gunicorn_conf.py: same workers, threads, access log) on 127.0.0.1, in one run:

- ``bare``: Flask that parses the CloudEvent with the SDK and answers 200 (the baseline);
- ``checks``: bare plus the handler's own checks (contract schema, ``check_request``), answering
  200 with no reply and storing nothing: the floor of any handler that validates on ingress;
- ``floor``: a bare Flask app doing the handler's ingress checks (the same ``ingress.decode``
  and ``Admission.check``) and one durable INSERT per accepted request (SQLite, WAL,
  ``synchronous=NORMAL``, as the handler's store): the same work, without the handler around it;
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
generator (client processes x threads, a fixed number of requests, new connection per request)
posts binary-mode job.requested events with unique job_uuids, rounds alternating between the
apps (each round starts once the previous app is idle again). It prints req/s, p50, p99 and
worker CPU per request for each, and each one's ratio to ``bare``. Targets (issue 3): handler
>= 0.9x bare, p99 <= 20 ms at 2 workers; (issue 11) handler >= 0.9x floor; (issue 13)
handler-traced >= 0.9x handler.

Part two (``--part remote``), remote mode: the latency the stateless handler adds on top of the
KFP stand-in's ``create_run``. The stand-in accepts runs and never starts them
(``Simulation(train_s=None)``); ``create_run`` is the same request body the handler sends
(the compiled pipeline and the job's parameters), POSTed straight to the stand-in with the same
load; ``handler`` is one gunicorn (``GUNICORN_WORKERS`` x ``GUNICORN_THREADS`` as in
knative/config.yaml), ``handler x3`` three of them, requests spread round-robin. A fresh stand-in
per configuration keeps its run list the same length for each, and between measurements what it
stores is frozen out of the garbage collector's view (``_freeze_standin``: a Python stand-in's
full collections, not KFP, would otherwise set both p99s). Each configuration is measured
at two loads in the same run: the concurrent one (``--clients``; on 2 cores it saturates them, so
"added" is mostly queueing behind the CPU a request costs) and one client at a time (the time the
handler itself adds). Targets (issue 11): at most 5 ms added at p50, p99 at most 20 ms. Run by
hand:

    .venv/bin/python bench/bench_handler.py [--part local|remote|both] [--backend hold|noop]
        [--requests 2000] [--remote-requests 400] [--workers 2] [--threads 1] [--clients 2x2]
        [--logs DIR] [--apps handler,handler-traced]
"""

from __future__ import annotations

import argparse
import gc
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def create_floor_app() -> Any:
    """The same work as the local handler's ingress, nothing around it: the handler's checks and
    one durable INSERT (``BENCH_FLOOR_DB``; WAL, synchronous=NORMAL), then an empty 200."""
    import sqlite3
    import threading

    from cloudevents.core.bindings.http import HTTPMessage
    from flask import request

    from handler import ingress
    from handler.admission import Admission
    from handler.settings import HandlerSettings

    admission = Admission(HandlerSettings.from_env())
    path = os.environ["BENCH_FLOOR_DB"]
    local = threading.local()

    def connection() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS jobs (job_uuid TEXT PRIMARY KEY, request TEXT NOT NULL)"
            )
            local.conn = conn
        return conn

    def receive() -> tuple[str, int]:
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
        return "", 200

    return _app("floor", receive)


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


def _client(
    ports: list[int],
    prefix: str,
    count: int,
    threads: int,
    dataset: str,
    token: str,
    out: Any,
    create_run: bytes | None = None,
) -> None:
    """One client process: ``threads`` threads sharing ``count`` requests, round-robin over
    ``ports``; latencies in ms. ``create_run``: POST that KFP run body (its display name made
    unique) to /apis/v2beta1/runs instead of a job.requested event."""
    import threading

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
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", path, body=body, headers=headers)
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


def run_load(
    port: int | list[int],
    prefix: str,
    requests: int,
    procs: int,
    threads: int,
    dataset: str,
    token: str = "",
    create_run: bytes | None = None,
):
    ports = port if isinstance(port, list) else [port]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    per = [requests // procs + (1 if i < requests % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_client,
            args=(ports, f"{prefix}-p{i}", n, threads, dataset, token, out, create_run),
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
    latencies = [x for lat, _, _ in results for x in lat]
    errors = sum(n for _, _, n in results)
    if errors:
        samples = [e for _, es, _ in results for e in es]
        raise SystemExit(f"{errors} failed requests against {ports}, e.g. {samples[:3]}")
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
        stats = {name: {"rps": [], "lat": [], "cpu": []} for name in apps}
        try:
            for name, (app, app_env) in apps.items():
                servers[name] = Server(
                    app, app_env, base / f"{name}.log", args.workers, args.threads
                )
            for server in servers.values():  # warm: imports, schema cache, connections
                run_load(server.port, "warm", 100, procs, threads, str(dataset), token)
                server.settle()
            for r in range(args.rounds):
                for name, server in servers.items():
                    cpu = server.cpu_s()
                    rps, lat = run_load(
                        server.port, f"r{r}", args.requests, procs, threads, str(dataset), token
                    )
                    stats[name]["cpu"].append((server.cpu_s() - cpu) / args.requests * 1e6)
                    stats[name]["rps"].append(rps)
                    stats[name]["lat"].extend(lat)
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

    print(
        f"gunicorn workers={args.workers} threads={args.threads}; backend {args.backend}; load "
        f"{procs} processes x {threads} threads; {args.rounds} rounds x {args.requests} requests"
    )
    bare_rps = statistics.median(stats["bare"]["rps"])
    print(
        f"{'app':13s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'cpu us/req':>10s} {'ratio':>6s}"
    )
    for name, st in stats.items():
        rps = statistics.median(st["rps"])
        print(
            f"{name:13s} {rps:8.1f} {_pct(st['lat'], 0.5):7.2f} {_pct(st['lat'], 0.99):7.2f} "
            f"{statistics.median(st['cpu']):10.0f} {rps / bare_rps:5.2f}x"
        )
    if "handler-auth" in stats and "handler" in stats:
        auth = statistics.median(stats["handler-auth"]["rps"]) / statistics.median(
            stats["handler"]["rps"]
        )
        print(
            f"handler-auth: {auth:.2f}x handler; {reviewed} TokenReviews for "
            f"{100 + args.rounds * args.requests} requests ({args.workers} workers)"
        )
    if "handler" in stats:
        ratio = statistics.median(stats["handler"]["rps"]) / bare_rps
        p99 = _pct(stats["handler"]["lat"], 0.99)
        print(f"targets: handler >= 0.90x bare (got {ratio:.2f}x), p99 <= 20 ms (got {p99:.2f} ms)")
    if "handler" in stats and "floor" in stats:
        ratio = statistics.median(stats["handler"]["rps"]) / statistics.median(
            stats["floor"]["rps"]
        )
        print(f"target: handler >= 0.90x floor (the same checks and one insert; got {ratio:.2f}x)")
    if "handler" in stats and "handler-traced" in stats:
        traced = statistics.median(stats["handler-traced"]["rps"])
        ratio = traced / statistics.median(stats["handler"]["rps"])
        print(
            f"tracing: handler-traced >= 0.90x handler (got {ratio:.2f}x; "
            f"{len(otlp.received())} spans received)"
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


def remote_part(args: argparse.Namespace, procs: int, threads: int) -> None:
    """Remote mode: latency on top of the KFP stand-in's create_run, one and three replicas."""
    from handler.remote.runs import KfpRuns
    from handler.settings import HandlerSettings
    from tests.kfp_standin import KfpStandin, Simulation

    rows: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], list[float]] = {}  # [handler workers, stand-in] CPU seconds
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
                servers = [
                    Server(
                        "handler:create_app()",
                        env,
                        base / f"remote-{replicas}-{i}.log",
                        args.workers,
                        max(args.threads, 4),
                    )
                    for i in range(replicas)
                ]
                ports = [s.port for s in servers]
                try:
                    run_load(standin.port, "warm-c", 50, procs, threads, dataset, create_run=body)
                    run_load(ports, "warm-h", 50 * replicas, procs, threads, dataset)
                    name = "handler" if replicas == 1 else "handler x3"
                    for r in range(args.rounds):
                        for load, (lp, lt) in _loads(procs, threads).items():
                            for label, target, extra in (
                                (f"create_run ({replicas})", standin.port, body),
                                (name, ports, None),
                            ):
                                _freeze_standin()
                                handler_cpu = sum(s.cpu_s() for s in servers)
                                # this process's CPU: the KFP stand-in's threads (the
                                # load generator runs in child processes)
                                standin_cpu = time.process_time()
                                rps, lat = run_load(
                                    target,
                                    f"{label[:6]}-{load[:3]}-r{r}",
                                    args.remote_requests,
                                    lp,
                                    lt,
                                    dataset,
                                    create_run=extra,
                                )
                                key = (label, load)
                                rows.setdefault(key, []).extend(lat)
                                rates[key] = max(rates.get(key, 0.0), rps)
                                spent = cpu.setdefault(key, [0.0, 0.0])
                                spent[1] += time.process_time() - standin_cpu
                                spent[0] += sum(s.cpu_s() for s in servers) - handler_cpu
                finally:
                    for server in servers:
                        server.stop()
    print(
        f"\nremote: {args.workers} workers x {max(args.threads, 4)} threads per replica; "
        f"{args.rounds} rounds x {args.remote_requests} requests per configuration and load; "
        f"loads: "
        + ", ".join(
            f"{k} = {p} processes x {t} threads" for k, (p, t) in _loads(procs, threads).items()
        )
    )
    print(
        f"{'':18s} {'load':>10s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'handler us CPU/req':>18s} {'stand-in us CPU/req':>19s}"
    )
    for (label, load), lat in rows.items():
        handler_s, standin_s = (1e6 * x / len(lat) for x in cpu[label, load])
        print(
            f"{label:18s} {load:>10s} {rates[label, load]:8.1f} {_pct(lat, 0.5):7.2f} "
            f"{_pct(lat, 0.99):7.2f} {handler_s:18.0f} {standin_s:19.0f}"
        )
    for replicas, name in ((1, "handler"), (3, "handler x3")):
        for load in _loads(procs, threads):
            base_lat = rows[f"create_run ({replicas})", load]
            lat = rows[name, load]
            p50 = _pct(lat, 0.5) - _pct(base_lat, 0.5)
            p99 = _pct(lat, 0.99) - _pct(base_lat, 0.99)
            print(
                f"{name} ({load}): adds {p50:.2f} ms at p50, {p99:.2f} ms at p99 on top of "
                f"create_run; p99 {_pct(lat, 0.99):.2f} ms (targets: <= 5 ms added at p50, "
                "p99 <= 20 ms)"
            )


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
