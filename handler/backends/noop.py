"""A backend that runs nothing: every job completes at once with an empty result.

For benchmarks of the ingress path and for smoke-testing a deployment's event wiring, selected
by configuration (``KFP_TRAINER_BACKEND=noop``), never by editing code.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from handler.backends.base import Backend, RunState
from handler.contract import JobStatus
from handler.settings import HandlerSettings
from handler.store import JobStore


class NoopBackend(Backend):
    """Completes every submitted job immediately, with no checkpoints."""

    name = "noop"
    poll_interval_s: float | None = 0.2

    def __init__(self, settings: HandlerSettings, store: JobStore) -> None:
        self.settings = settings
        self.store = store

    def submit(self, request: dict[str, Any]) -> str:
        return f"noop-{request['job_uuid']}"

    def status(self, job_uuid: str, run_id: str | None) -> RunState:
        now = datetime.now(UTC)
        return RunState(
            status=JobStatus.completed,
            run_id=run_id,
            completed_at=now,
            result={"checkpoints": [], "dataset_rows": 0},
        )

    def cancel(self, job_uuid: str, run_id: str | None) -> None:
        return None

    def ready(self) -> bool:
        return True


class HoldBackend(NoopBackend):
    """Accepts every job and starts none: jobs stay scheduled (cancel still works).

    Selected with ``KFP_TRAINER_BACKEND=hold``: benchmarks of the ingress path alone, and a
    deployment that should queue requests without running them (e.g. while KFP is maintained).
    """

    name = "hold"
    max_concurrent: int | None = 0
    poll_interval_s: float | None = None
