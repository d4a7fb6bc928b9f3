"""gunicorn configuration for the handler: ``gunicorn -c handler/gunicorn_conf.py``.

Everything comes from the environment, as Knative provides it: ``PORT`` (default 8080; or a
full ``GUNICORN_BIND`` such as ``127.0.0.1:9000`` or ``fd://3``), ``GUNICORN_WORKERS`` (default
2), ``GUNICORN_THREADS`` (default 1: sync workers; more selects the gthread worker),
``GUNICORN_TIMEOUT`` and ``GUNICORN_GRACEFUL_TIMEOUT``. The app is built per worker by the
factory (no preload), so each worker has its own store connections and threads; the hooks
below start those threads as soon as the worker boots (queued jobs continue after a restart
without waiting for a request) and stop them on SIGTERM. Logs, access log included, are JSON
lines on stdout. Metrics use prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``
(a fresh temporary directory unless the deployment names one) is emptied when gunicorn starts,
and a dead worker's files are marked by ``child_exit``, so ``/metrics`` sums the live workers
and keeps the counts of those gone. With ``KFP_TRAINER_METRICS_PORT`` (knative/config.yaml: 9095;
unset: off) the master serves that sum on its own port too, outside Knative's request path, so
a scrape neither counts as traffic nor keeps a pod from scaling to zero (docs/deploy.md,
"Metrics").
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any

from handler.settings import SettingsError, env_int


def _int(name: str, default: int, minimum: int = 1) -> int:
    try:
        return env_int(os.environ, name, default, minimum)
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None


wsgi_app = "handler:create_app()"
bind = [os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{_int('PORT', 8080)}"]
workers = _int("GUNICORN_WORKERS", 2)
metrics_port = _int("KFP_TRAINER_METRICS_PORT", 0, minimum=0)
threads = _int("GUNICORN_THREADS", 1)
timeout = _int("GUNICORN_TIMEOUT", 60)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 20)
keepalive = 5
preload_app = False
control_socket_disable = True  # gunicorn >= 24's admin socket: one fixed path per user, unused
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("KFP_TRAINER_LOG_LEVEL", "info").lower()

logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "handler.logs.JsonFormatter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        }
    },
    "root": {"handlers": ["stdout"], "level": "INFO"},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
    },
}


def on_starting(server: Any) -> None:
    """Give the workers (forked later, so they inherit it) one metrics directory, from zero:
    files a previous gunicorn left are not ours to sum. The master never imports
    prometheus_client before this, which picks its multiprocess storage at import."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kfp-trainer-metrics-")
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink(missing_ok=True)


def when_ready(server: Any) -> None:
    """Serve every worker's metrics from the master on KFP_TRAINER_METRICS_PORT
    (prometheus_client's own server over the multiprocess collector)."""
    if not metrics_port:
        return
    from prometheus_client import start_http_server

    from handler.metrics import registry

    try:
        start_http_server(metrics_port, registry=registry())
    except OSError as exc:  # events still flow; /metrics on the app port still answers
        server.log.error(f"metrics port {metrics_port} not served: {exc}")


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: its gauges go, its counters stay in the sum (prometheus_client)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _service(worker: Any) -> Any:
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("kfp_trainer")


def post_worker_init(worker: Any) -> None:
    """Start this worker's dispatcher and outbox threads now, not on the first request.

    Everything loaded so far (the app, its modules) lives as long as the worker: freezing it
    keeps the garbage collector from rescanning it, which shows as latency spikes otherwise.
    """
    service = _service(worker)
    if service is not None:
        service.start_once()
    gc.freeze()


def worker_exit(server: Any, worker: Any) -> None:
    """Stop the threads, hand this worker's running jobs back for adoption, export its spans."""
    from pipelines import tracing

    service = _service(worker)
    if service is not None:
        service.stop(timeout=max(1.0, graceful_timeout - 2))
    tracing.shutdown()
