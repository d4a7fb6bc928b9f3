"""Remote mode after the handler's store is lost: KFP (plus S3) is the system of record.

A Knative Service's SQLite store is container-local, so a restarted container starts empty
while KFP still runs (or has finished) the jobs it submitted. Each test here submits through a
handler under gunicorn, stops it, deletes its state directory, starts it again with a fresh
store, and then sends what Knative would: the run's ``run.finished`` notice, a cancel request,
or a PingSource tick. The terminal event must reach the sink exactly once, with the contract's
deterministic id. The first handler's runs carry its URL as their notice address, so once it
is stopped their own notices are lost (as a notice to a container being replaced would be).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from handler import contract
from handler.settings import RemoteSettings
from tests.remote import fixtures as fx
from tests.remote.remote_world import RemoteHandler
from tests.support.loopback import wait_for
from tests.support.sink import Sink

TOKEN = "readopt-token-0001"
RUN_TIMEOUT_S = 600
LONG = {"n_epochs": 500, "max_steps_per_epoch": 4}  # runs until cancelled


class World:
    """The KFP stand-in, S3 (moto), a sink and one handler whose store can be thrown away."""

    def __init__(self, tmp: Path, remote: RemoteSettings, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.remote = remote
        self.env = env
        self.state_dir = Path(env["KFP_TRAINER_STATE_DIR"])
        self.sink = Sink().__enter__()
        self.standin = fx.standin_with_secrets(tmp / "standin", TOKEN).start()
        self.env["KFP_HOST"] = self.standin.url
        self.env["KFP_TRAINER_SINK"] = self.sink.url
        self.lives = 0
        self.handler = self._start()

    def _start(self, port: int = 0) -> RemoteHandler:
        self.lives += 1
        log = self.tmp / f"handler-{self.lives}.log"
        return RemoteHandler(self.env, log, workers=2, port=port).start()

    def stop_and_lose_the_store(self) -> int:
        """Stop the handler and delete its store (the container is gone); returns its port."""
        self.handler.stop()
        assert (self.state_dir / "handler.sqlite3").exists()
        shutil.rmtree(self.state_dir)
        return self.handler.port

    def start_with_a_fresh_store(self, port: int = 0) -> RemoteHandler:
        """Start a handler on ``port`` (0: a new one; a Service keeps its own) with no store."""
        self.handler = self._start(port)
        status, body = self.get("/jobs")
        assert status == 200 and body["jobs"] == [], body
        return self.handler

    def restart_with_a_fresh_store(self) -> RemoteHandler:
        """Stop the handler, delete its store (the container is replaced), start it again."""
        self.stop_and_lose_the_store()
        return self.start_with_a_fresh_store()

    def get(self, path: str) -> tuple[int, dict]:
        from tests.support.http_client import curl

        status, _, body = curl(self.handler.url + path)
        return status, json.loads(body)

    def run_of(self, job_uuid: str) -> dict:
        runs = fx.runs_named(self.standin, job_uuid)
        assert len(runs) == 1, runs
        return runs[0]

    def run_log(self, run: dict) -> str:
        return self.standin.state.run_log(run["run_id"])

    def wait_run_state(self, job_uuid: str, states: tuple[str, ...], timeout: float) -> dict:
        def reached() -> dict | None:
            run = self.run_of(job_uuid)
            return run if run["state"] in states else None

        try:
            return wait_for(reached, timeout, f"the run of {job_uuid} to be {states}", every=0.5)
        except AssertionError:
            run = self.run_of(job_uuid)
            raise AssertionError(
                f"run of {job_uuid} is {run['state']}, not {states}; log tail:\n"
                f"{self.standin.state.run_log(run['run_id'])[-3000:]}"
            ) from None

    def event(self, job_uuid: str, short_type: str, timeout: float = 60) -> dict:
        def diagnose() -> str:
            return f"\nhandler log tail:\n{self.handler.log_text()[-4000:]}"

        return fx.wait_event(self.sink, job_uuid, short_type, timeout, 0.3, diagnose)

    def submit(self, job_uuid: str, **training: int) -> None:
        data = fx.remote_request(self.remote, job_uuid, self.tmp)
        data["training_config"].update(training)
        status, headers, body = self.handler.request(data, self.tmp)
        assert status == 200, body
        assert headers["ce-id"] == f"{job_uuid}/job.scheduled"
        self.event(job_uuid, "job.started")  # the KFP run exists

    def close(self) -> None:
        self.handler.stop()
        self.standin.close()
        self.sink.__exit__(None, None, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_url):
    tmp = tmp_path_factory.mktemp("remote-readopt")
    mp = pytest.MonkeyPatch()
    remote, _, env = fx.remote_setup(tmp, moto_url, "remote-readopt", TOKEN, mp)
    world = World(tmp, remote, {**env, "KFP_EXPERIMENT": "readopt"})
    try:
        yield world
    finally:
        world.close()
        mp.undo()


def settle_then_count(world: World, job_uuid: str, short_type: str) -> int:
    time.sleep(2)  # time for a duplicate to arrive, if one were emitted
    return world.sink.types(job_uuid).count(short_type)


def test_notice_after_a_restart_emits_job_completed_once(world):
    world.submit("ra-notice", n_epochs=3)  # a few seconds of training: the restart comes first
    handler = world.restart_with_a_fresh_store()
    run = world.wait_run_state("ra-notice", ("SUCCEEDED", "FAILED"), RUN_TIMEOUT_S)
    assert run["state"] == "SUCCEEDED", world.standin.state.run_log(run["run_id"])[-3000:]
    assert "job.completed" not in world.sink.types("ra-notice"), "ended before the restart"
    assert "run-finished notice not delivered" in world.standin.state.run_log(run["run_id"])

    # The notice (as the exit task sends it; Knative would redeliver it) reaches the new store.
    notice = {"job_uuid": "ra-notice", "run_id": run["run_id"], "state": "SUCCEEDED"}
    status, _, body = handler.post_event(contract.RUN_FINISHED, notice, "n-1", world.tmp)
    assert status == 202, body
    assert json.loads(body) == {"job_uuid": "ra-notice", "status": "completed"}
    completed = world.event("ra-notice", "job.completed")
    assert completed["id"] == "ra-notice/job.completed"
    assert completed["data"]["run_id"] == run["run_id"]
    assert completed["data"]["dataset_rows"] == 8
    assert completed["data"]["checkpoints"][0]["path"].startswith(f"s3://{world.remote.s3_bucket}/")

    # Redelivered notices and ticks change nothing; the job is in the new store now.
    assert handler.post_event(contract.RUN_FINISHED, notice, "n-1", world.tmp)[0] == 202
    assert handler.ping(world.tmp, 1)[0] == 202
    assert settle_then_count(world, "ra-notice", "job.completed") == 1
    assert world.sink.types("ra-notice") == ["job.started", "job.completed"]
    status, jobs = world.get("/jobs")
    assert [(j["job_uuid"], j["status"], j["run_id"]) for j in jobs["jobs"]] == [
        ("ra-notice", "completed", run["run_id"])
    ]


def test_cancel_after_a_restart_terminates_the_run_and_emits_job_cancelled_once(world):
    world.submit("ra-cancel", **LONG)
    world.wait_run_state("ra-cancel", ("RUNNING",), 120)
    handler = world.restart_with_a_fresh_store()
    assert world.get("/jobs/ra-cancel")[1]["status"] == "in_progress"  # from KFP, not the store

    status, _, body = handler.cancel("ra-cancel", world.tmp)
    assert status == 202, body
    assert json.loads(body)["status"] == "cancelled"
    cancelled = world.event("ra-cancel", "job.cancelled")
    assert cancelled["id"] == "ra-cancel/job.cancelled"
    assert world.run_of("ra-cancel")["state"] in ("CANCELING", "CANCELED")
    world.wait_run_state("ra-cancel", ("CANCELED",), 60)

    assert handler.cancel("ra-cancel", world.tmp)[0] == 202  # Knative redelivers: same answer
    assert handler.ping(world.tmp, 2)[0] == 202
    assert settle_then_count(world, "ra-cancel", "job.cancelled") == 1
    assert "job.completed" not in world.sink.types("ra-cancel")


def test_ping_after_a_restart_adopts_the_unfinished_run_and_announces_its_end(world):
    world.submit("ra-ping", **LONG)
    run = world.wait_run_state("ra-ping", ("RUNNING",), 120)
    handler = world.restart_with_a_fresh_store()

    status, _, body = handler.ping(world.tmp, 3)
    assert status == 202, body
    assert json.loads(body) == {"reconciled": 1, "adopted": 1}
    status, jobs = world.get("/jobs")  # the store's own list: the job is in it now
    assert [(j["job_uuid"], j["status"], j["run_id"]) for j in jobs["jobs"]] == [
        ("ra-ping", "in_progress", run["run_id"])
    ]
    assert "job.cancelled" not in world.sink.types("ra-ping")

    # The run ends outside the handler (stopped from the KFP UI): a terminated run posts no
    # notice, so the next tick announces it.
    world.standin.state.terminate_run(run["run_id"])
    world.wait_run_state("ra-ping", ("CANCELED",), 60)
    status, _, body = handler.ping(world.tmp, 4)
    assert status == 202, body
    assert json.loads(body) == {"reconciled": 1, "adopted": 0}
    cancelled = world.event("ra-ping", "job.cancelled")
    assert cancelled["id"] == "ra-ping/job.cancelled"
    assert handler.ping(world.tmp, 5)[0] == 202
    assert settle_then_count(world, "ra-ping", "job.cancelled") == 1


def test_a_job_neither_the_store_nor_kfp_knows_is_a_clear_400(world):
    handler = world.handler
    status, _, body = handler.cancel("ra-never", world.tmp)
    assert status == 400, body
    assert json.loads(body)["message"] == (
        "unknown job 'ra-never': neither the job store nor the remote backend has it; "
        "nothing to cancel"
    )
    notice = {"job_uuid": "ra-never", "state": "SUCCEEDED"}
    status, _, body = handler.post_event(contract.RUN_FINISHED, notice, "n-never", world.tmp)
    assert status == 400, body
    assert json.loads(body)["message"].endswith("remote backend has it; no run to reconcile")
    assert world.sink.of("ra-never") == []


def test_a_run_that_ends_while_the_handler_is_down_is_announced_once_it_is_back(world):
    """A rollout: the container is replaced just as a run ends. The exit task keeps retrying
    its notice at the Service's (unchanged) URL, so the new container, with an empty store,
    learns of the run from the notice itself, re-adopts it and announces its end."""
    world.env["KFP_TRAINER_NOTIFY_WINDOW_S"] = "120"  # what runs submitted now are given
    try:
        world.restart_with_a_fresh_store()
        world.submit("ra-down", n_epochs=3)
        port = world.stop_and_lose_the_store()

        def notice_waiting() -> dict | None:
            run = world.run_of("ra-down")
            return run if "run-finished notice not delivered" in world.run_log(run) else None

        run = wait_for(notice_waiting, RUN_TIMEOUT_S, "the run's notice to find nobody", every=0.5)
        time.sleep(8)  # the Service stays down longer than the other tests' 3 s window
        assert world.run_of("ra-down")["state"] == "RUNNING"  # its exit task is still trying
        world.start_with_a_fresh_store(port)
        completed = world.event("ra-down", "job.completed", timeout=90)
        assert completed["id"] == "ra-down/job.completed"
        assert completed["data"]["run_id"] == run["run_id"]
        assert completed["data"]["checkpoints"], completed["data"]
        run = world.wait_run_state("ra-down", ("SUCCEEDED",), 60)
        assert "run-finished notice delivered" in world.run_log(run)
        assert settle_then_count(world, "ra-down", "job.completed") == 1
    finally:
        world.env["KFP_TRAINER_NOTIFY_WINDOW_S"] = "3"
