"""Backends selected by configuration (KFP_TRAINER_BACKEND=tests.handler.backends_for_tests:X)."""

from __future__ import annotations

import sys
from pathlib import Path

from handler.backends.base import RunState
from handler.backends.local import LocalBackend
from handler.backends.noop import NoopBackend
from handler.contract import JobStatus
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


class DescribingBackend(NoopBackend):
    """A system-of-record backend (like remote KFP): knows jobs this replica never saw, and
    names a default model store (from KFP_TRAINER_STATE_DIR/models, for the test)."""

    name = "describing"
    describes_jobs = True

    def status(self, job_uuid: str, run_id: str | None) -> RunState:
        if run_id is None and not job_uuid.startswith("elsewhere-"):
            return RunState(JobStatus.scheduled, None)
        return RunState(
            JobStatus.completed,
            run_id or f"kfp-{job_uuid}",
            result={"dataset_rows": 3, "checkpoints": []},
        )

    def default_model_store(self) -> str:
        return str(self.settings.state_dir.parent / "default-models")


class RecordBackend(NoopBackend):
    """A system of record kept in memory (like KFP in remote mode): the test sets each run's
    state in ``runs``; ``list_active`` lists the unfinished ones, as the remote backend does."""

    name = "record"
    describes_jobs = True
    poll_interval_s = None

    def __init__(self, settings: HandlerSettings, store: JobStore) -> None:
        super().__init__(settings, store)
        self.runs: dict[str, RunState] = {}
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def submit(self, request: dict) -> str:
        job_uuid = request["job_uuid"]
        self.submitted.append(job_uuid)
        self.runs.setdefault(job_uuid, RunState(JobStatus.in_progress, f"run-{job_uuid}"))
        return self.runs[job_uuid].run_id or ""

    def status(self, job_uuid: str, run_id: str | None) -> RunState:
        return self.runs.get(job_uuid, RunState(JobStatus.scheduled))

    def cancel(self, job_uuid: str, run_id: str | None) -> None:
        self.cancelled.append(job_uuid)
        run = self.runs.get(job_uuid)
        if run is not None and not run.status.terminal:
            self.runs[job_uuid] = RunState(JobStatus.cancelled, run.run_id)

    def list_active(self) -> list[str]:
        return [job for job, run in self.runs.items() if not run.status.terminal]
