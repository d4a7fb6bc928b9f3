"""Backends selected by configuration (KFP_TRAINER_BACKEND=tests.handler.backends_for_tests:X)."""

from __future__ import annotations

import sys
from pathlib import Path

from handler.backends.local import LocalBackend
from handler.backends.noop import NoopBackend
from handler.settings import HandlerSettings
from handler.store import JobStore

FAKE_RUN = Path(__file__).with_name("fake_pipeline_run.py")


class FakeRunLocalBackend(LocalBackend):
    """The real local backend, running tests/handler/fake_pipeline_run.py instead of pipelines."""

    def __init__(self, settings: HandlerSettings, store: JobStore) -> None:
        super().__init__(settings, store, command=[sys.executable, str(FAKE_RUN)])


class NotReadyBackend(NoopBackend):
    """A backend that cannot take work (as when the KFP server is down)."""

    name = "not-ready"

    def ready(self) -> bool:
        return False


class BrokenBackend(NoopBackend):
    """A backend whose readiness check crashes with internals in the message."""

    name = "broken"

    def ready(self) -> bool:
        raise RuntimeError("secret-internal-detail /var/run/token")
