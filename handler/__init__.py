"""The event handler: a Flask app that turns request CloudEvents into pipeline runs.

This package exposes only :func:`create_app`; importing it builds nothing (no app, no store, no
threads). gunicorn calls the factory per worker (``handler:create_app()``); tests call it with
their own settings; the provider uses ``handler.service.create_service`` without Flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from handler.settings import HandlerSettings

EXTENSION = "kfp_trainer"
SERVICE_NAME = "kfp-trainer-handler"


def create_app(settings: HandlerSettings | None = None) -> Flask:
    """Build the Flask app: one service per app (handler.services), blueprints on top.

    :param settings: defaults to ``HandlerSettings.from_env()`` (read once, here, at the edge).
    Local mode's service (store, backend, threads) starts its threads on the first request, or
    at once under gunicorn (``post_worker_init`` in handler/gunicorn_conf.py); remote mode's
    keeps no state. ``app.extensions["kfp_trainer"]`` is the service.
    """
    from flask import Flask

    from handler import errors, events, identity, logs, metrics, status
    from handler.services import build_service
    from handler.settings import HandlerSettings
    from pipelines import tracing

    settings = settings or HandlerSettings.from_env()
    logs.configure(settings.log_level)
    tracing.init(SERVICE_NAME)  # OTEL_* variables; nothing is exported without an endpoint
    app = Flask(__name__)
    app.config.update(KFP_TRAINER_SETTINGS=settings, JSON_SORT_KEYS=False)
    service = build_service(settings)
    app.extensions[EXTENSION] = service
    app.before_request(service.start_once)
    identity.init_app(app, settings.auth, settings.retry_after_s)  # callers checked first
    errors.init_app(app)
    app.register_blueprint(events.bp)
    app.register_blueprint(status.bp)
    metrics.init_app(app)
    return app
