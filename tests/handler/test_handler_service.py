"""LocalService in-process (the provider's path) with the local backend's process handling.

The local backend here runs tests/handler/fake_pipeline_run.py (same arguments and files as
``python -m pipelines run``) so spawn, progress, exit codes, cancel and adoption are exact and
quick; test_handler_training.py runs the real pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from handler import contract, procs
from handler.service import LocalService, create_service
from handler.settings import HandlerSettings
from tests.handler.conftest import FAKE_BACKEND
from tests.handler.helpers import cancel_message, request_data, requested_message
from tests.support.loopback import wait_for


class Recorder:
    """An in-process subscriber."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def types(self, job_uuid: str) -> list[str]:
        with self.lock:
            return [
                e.get_type().removeprefix(contract.PREFIX)
                for e in self.events
                if e.get_subject() == job_uuid
            ]

    def last(self, job_uuid: str, short_type: str) -> dict[str, Any]:
        with self.lock:
            for e in reversed(self.events):
                if e.get_subject() == job_uuid and e.get_type() == contract.PREFIX + short_type:
                    return contract.event_data(e)
        raise AssertionError(f"no {short_type} for {job_uuid}")


@pytest.fixture
def services():
    made: list[LocalService] = []
    yield made
    for s in made:
        s.stop(timeout=5)


@pytest.fixture
def local(env, services):
    """Make a started service over the local backend (fake run) and a subscriber."""

    def make(**extra: str) -> tuple[LocalService, Recorder]:
        settings = HandlerSettings.from_env(
            {**env, "KFP_TRAINER_BACKEND": FAKE_BACKEND, "KFP_TRAINER_LOCAL_WORKERS": "1", **extra}
        )
        service = create_service(settings)
        recorder = Recorder()
        service.subscribe(recorder)
        service.start()
        services.append(service)
        return service, recorder

    return make


def fake(job_uuid: str, dataset: Path, **cfg: Any) -> dict[str, Any]:
    return request_data(job_uuid, dataset, logger_config={"fake": cfg})


def submit(service: LocalService, data: dict[str, Any]) -> Any:
    reply = service.handle(requested_message(data))
    assert reply.status == 200, reply.body
    return reply


def status_of(service: LocalService, job_uuid: str) -> str:
    return service.job(job_uuid)["status"]


def job_dir(service: LocalService, job_uuid: str) -> Path:
    return service.settings.state_dir / "jobs" / job_uuid


def starts(service: LocalService, job_uuid: str) -> int:
    log = job_dir(service, job_uuid) / "work" / "starts.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_in_process_request_runs_to_completion_with_progress(local, dataset, sink):
    service, rec = local(K_SINK=sink.url, K_CE_OVERRIDES='{"extensions": {"team": "ml"}}')
    reply = submit(service, fake("job-1", dataset, steps=4, step_s=0.3))
    assert reply.event is not None and reply.event.get_type() == contract.JOB_SCHEDULED
    wait_for(lambda: "job.completed" in rec.types("job-1"), 30, "job.completed")
    types = rec.types("job-1")
    assert types[:2] == ["job.scheduled", "job.started"]
    assert types[-1] == "job.completed"
    assert "job.progress" in types
    done = rec.last("job-1", "job.completed")
    assert done["status"] == "completed"
    assert done["run_id"].startswith("local-")
    assert done["checkpoints"][0]["post_training_job_id"] == "job-1"
    assert Path(done["checkpoints"][0]["path"]).is_dir()
    assert done["dataset_rows"] == 8
    assert done["rows_without_trainable_tokens"] == 1  # as result.json says
    assert service.job("job-1")["rows_without_trainable_tokens"] == 1
    assert done["progress"]["total_steps"] == 4
    for key in ("scheduled_at", "started_at", "completed_at"):
        assert done[key]
    # The sink gets everything except job.scheduled (that one was the HTTP reply), in order,
    # with the K_CE_OVERRIDES extension.
    wait_for(lambda: "job.completed" in sink.types("job-1"), 10, "sink job.completed")
    assert sink.types("job-1")[0] == "job.started"
    assert "job.scheduled" not in sink.types("job-1")
    assert all(e["team"] == "ml" for e in sink.of("job-1"))
    assert len({e["id"] for e in sink.of("job-1")}) == len(sink.of("job-1"))
    assert service.job("job-1")["checkpoints"] == done["checkpoints"]


def test_progress_events_are_throttled(local, dataset):
    service, rec = local(KFP_TRAINER_PROGRESS_INTERVAL_S="60")
    submit(service, fake("job-t", dataset, steps=8, step_s=0.15))
    wait_for(lambda: "job.completed" in rec.types("job-t"), 30, "job.completed")
    assert rec.types("job-t").count("job.progress") == 1
    assert service.job("job-t")["progress"]["step"] == 8  # the store still has the latest


def test_jobs_run_one_at_a_time_in_order(local, dataset):
    service, rec = local()
    for name in ("q-1", "q-2", "q-3"):
        submit(service, fake(name, dataset, steps=2, step_s=0.1))
    wait_for(lambda: "job.completed" in rec.types("q-3"), 60, "q-3 completed")
    jobs = [service.job(n) for n in ("q-1", "q-2", "q-3")]
    assert [j["status"] for j in jobs] == ["completed"] * 3
    for earlier, later in zip(jobs, jobs[1:], strict=False):
        assert later["started_at"] >= earlier["completed_at"]


def test_a_crash_without_result_is_failed_naming_the_cause(local, dataset):
    service, rec = local()
    submit(service, fake("job-crash", dataset, outcome="crash"))
    wait_for(lambda: "job.failed" in rec.types("job-crash"), 30, "job.failed")
    error = rec.last("job-crash", "job.failed")["error"]
    assert error.startswith("the training process exited with code 3 and wrote no result")
    assert "boom: simulated crash in the trainer" in error


def test_a_failed_run_reports_its_error(local, dataset):
    service, rec = local()
    submit(service, fake("job-bad", dataset, outcome="failed"))
    wait_for(lambda: "job.failed" in rec.types("job-bad"), 30, "job.failed")
    assert rec.last("job-bad", "job.failed")["error"] == "simulated training failure"


def test_cancel_stops_the_running_process_group(local, dataset):
    service, rec = local()
    submit(service, fake("job-long", dataset, steps=600, step_s=0.1, grandchild=True))
    pid_file = job_dir(service, "job-long") / "work" / "grandchild.pid"
    wait_for(
        lambda: pid_file.exists() and status_of(service, "job-long") == "in_progress", 30, "run"
    )
    grandchild = int(pid_file.read_text())
    token = procs.token(grandchild)
    reply = service.handle(cancel_message("job-long"))
    assert reply.status == 202
    # "cancelled" when the process was already gone by the time the handler looked again.
    assert reply.json()["status"] in ("cancelling", "cancelled")
    wait_for(lambda: "job.cancelled" in rec.types("job-long"), 30, "job.cancelled")
    assert status_of(service, "job-long") == "cancelled"
    wait_for(lambda: not procs.alive(token), 10, "the grandchild to be gone")
    again = service.handle(cancel_message("job-long"))
    assert (again.status, again.json()["status"]) == (202, "cancelled")


def test_cancel_drops_a_queued_job(local, dataset):
    service, rec = local()
    submit(service, fake("first", dataset, steps=600, step_s=0.1))
    submit(service, fake("second", dataset))
    wait_for(lambda: status_of(service, "first") == "in_progress", 30, "first running")
    reply = service.handle(cancel_message("second"))
    assert reply.json() == {"job_uuid": "second", "status": "cancelled"}
    wait_for(lambda: "job.cancelled" in rec.types("second"), 10, "second cancelled")
    assert rec.types("second") == ["job.scheduled", "job.cancelled"]
    service.handle(cancel_message("first"))
    wait_for(lambda: status_of(service, "first") == "cancelled", 30, "first cancelled")
    assert starts(service, "second") == 0


def test_restart_adopts_the_running_job_and_continues_the_queue(local, dataset):
    one, _ = local()
    submit(one, fake("r-1", dataset, steps=15, step_s=0.2))
    submit(one, fake("r-2", dataset, steps=1))
    wait_for(lambda: status_of(one, "r-1") == "in_progress", 30, "r-1 running")
    one.stop()
    assert status_of(one, "r-2") == "scheduled"
    two, rec = local()
    wait_for(lambda: "job.completed" in rec.types("r-2"), 60, "r-2 completed after restart")
    assert status_of(two, "r-1") == "completed"
    assert starts(two, "r-1") == 1  # adopted, not started again
    # What the first service had not delivered yet reached the new one's subscriber, in order.
    assert rec.types("r-1")[-1] == "job.completed"
    assert rec.types("r-2")[0] == "job.started"
    assert rec.types("r-2")[-1] == "job.completed"
    assert len(set(rec.types("r-2"))) == len(rec.types("r-2"))


def test_a_run_that_died_with_its_handler_is_failed_with_that_reason(local, dataset):
    one, _ = local()
    submit(one, fake("d-1", dataset, steps=600, step_s=0.1))
    wait_for(lambda: status_of(one, "d-1") == "in_progress", 30, "d-1 running")
    pid = one.store.backend_state("d-1")["pid"]
    one.stop()
    os.killpg(pid, signal.SIGKILL)  # the training dies while no handler is up
    two, rec = local()
    wait_for(lambda: "job.failed" in rec.types("d-1"), 30, "d-1 failed")
    error = rec.last("d-1", "job.failed")["error"]
    assert error.startswith(f"the training process (pid {pid}) is gone: it ended while no handler")
    assert two.job("d-1")["status"] == "failed"


def test_undelivered_events_are_retried_with_backoff(env, services, dataset, sink):
    sink.fail = True
    settings = HandlerSettings.from_env({**env, "K_SINK": sink.url})
    service = create_service(settings)
    failures = {"left": 2}
    got: list[str] = []

    def flaky(event: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("subscriber not ready")
        got.append(event.get_id())

    service.subscribe(flaky)
    service.start()
    services.append(service)
    submit(service, request_data("o-1", dataset))
    wait_for(lambda: sink.attempts >= 3, 20, "three failed sink attempts")
    assert sink.events == []
    assert service.store.pending_events() > 0
    sink.fail = False
    wait_for(lambda: "job.completed" in sink.types("o-1"), 20, "delivery after recovery")
    assert sink.types("o-1") == ["job.started", "job.completed"]
    wait_for(lambda: service.store.pending_events() == 0, 10, "outbox drained")
    assert got == ["o-1/job.scheduled", "o-1/job.started", "o-1/job.completed"]


def test_bad_ce_overrides_fail_at_startup(env):
    from handler.settings import SettingsError

    with pytest.raises(SettingsError, match="K_CE_OVERRIDES: Bad-Key cannot be"):
        HandlerSettings.from_env({**env, "K_CE_OVERRIDES": '{"extensions": {"Bad-Key": 1}}'})
    built = dataclasses.replace(HandlerSettings.from_env(env), ce_overrides={"id": "x"})
    with pytest.raises(SettingsError, match="K_CE_OVERRIDES: id cannot be"):
        create_service(built)


def test_job_status_shape_matches_the_contract(local, dataset):
    service, rec = local()
    submit(service, fake("shape", dataset, steps=1))
    wait_for(lambda: status_of(service, "shape") == "completed", 30, "completed")
    status = service.job("shape")
    contract.validate_data(contract.JOB_COMPLETED, status)
    assert json.loads(json.dumps(service.jobs().jobs))[0]["job_uuid"] == "shape"
