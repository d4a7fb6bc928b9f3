"""The stateless remote handler, event by event: every answer from the event, KFP and S3 alone.

Each app here is built fresh over the same KFP stand-in (simulated runs: the pipeline's effects
without training) and moto, so "another replica" or "a restarted pod" is just another app: no
store, nothing shared. The defects of issue 11 each have a case here that the old handler
failed: a changed redelivery accepted once the store was lost (3), a notice answered 202 while
S3 was down or while KFP still said RUNNING (1), a cancel racing completion that hid the model
(4), pings that never found a run that ended while no pod was up (1), and a KFP outage answered
404 (2).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask import Flask

from handler import EXTENSION, contract, create_app
from handler.remote import s3
from handler.settings import HandlerSettings
from tests.kfp_standin import KfpStandin, Simulation
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.support.jobs import job_request, write_dataset
from tests.support.loopback import wait_for
from tests.support.s3 import FaultyS3
from tests.support.sink import Sink


class World:
    """The KFP stand-in, S3, a K_SINK, and as many handler apps as a test wants."""

    def __init__(self, tmp, s3_env: dict[str, str], bucket: str, sink: Sink) -> None:
        self.tmp = tmp
        self.bucket = bucket
        self.sink = sink
        self.standin = KfpStandin(token=None, work_dir=tmp / "kfp", simulate=Simulation(0.3))
        self.standin.set_secret(
            fx.S3_SECRET,
            {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY},
        )
        self.standin.set_task_env({"S3_ENDPOINT_URL": s3_env["S3_ENDPOINT_URL"]})
        self.standin.start()
        self.env = {
            **s3_env,
            "KFP_TRAINER_MODE": "remote",
            "KFP_HOST": self.standin.url,
            "KFP_EXPERIMENT": "service",
            "S3_BUCKET": bucket,
            "S3_PREFIX": fx.PREFIX,
            "K_SINK": sink.url,
            "KFP_TRAINER_RETRY_AFTER_S": "4",
            "KFP_TRAINER_NOTIFY_WINDOW_S": "2",
            "KFP_TRAINER_CANCEL_WAIT_S": "10",
        }
        self.apps: list[Flask] = []

    def app(self, **env: str) -> Flask:
        app = create_app(HandlerSettings.from_env({**self.env, **env}))
        self.apps.append(app)
        return app

    def post(self, app: Flask, event_type: str, data: dict[str, Any], **headers: str) -> Any:
        event = (
            contract.make_event(event_type, "/tests", data) if event_type != contract.PING else None
        )
        if event is None:
            message_headers = {
                "ce-specversion": "1.0",
                "ce-id": f"tick-{time.monotonic_ns()}",
                "ce-source": "/apis/v1/namespaces/ns/pingsources/tick",
                "ce-type": contract.PING,
                "Content-Type": "application/json",
            }
            return app.test_client().post("/", headers=message_headers, data=b"{}")
        message = contract.to_http(event)
        return app.test_client().post(
            "/", headers={**message.headers, **headers}, data=message.body
        )

    def request(self, job_uuid: str, **training: Any) -> dict[str, Any]:
        local = write_dataset(self.tmp / f"{job_uuid}.jsonl")
        key = f"{fx.PREFIX}/datasets/{job_uuid}.jsonl"
        s3.s3_client(self.remote()).upload_file(str(local), self.bucket, key)
        data = job_request(job_uuid, f"s3://{self.bucket}/{key}")
        data["model_artifact"] = {"uri": f"s3://{self.bucket}/{fx.PREFIX}/models/m.tar"}
        data["training_config"].update(training)
        return data

    def remote(self):
        return HandlerSettings.from_env(self.env).remote

    def run_of(self, job_uuid: str) -> dict[str, Any]:
        (run,) = fx.runs_named(self.standin, job_uuid)
        return run

    def wait_state(self, job_uuid: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.run_of(job_uuid))["state"] in states and r,
            timeout,
            f"the run of {job_uuid} to be {states}",
            every=0.1,
        )

    def notice(self, job_uuid: str) -> dict[str, Any]:
        """The exit task's run.finished as it reached K_SINK (the Broker)."""
        return wait_for(
            lambda: [e for e in self.sink.of(job_uuid) if e["type"] == contract.RUN_FINISHED],
            30,
            f"the notice of {job_uuid}",
        )[0]

    def put_manifest(self, job_uuid: str, manifest: dict[str, Any]) -> None:
        key = s3.job_prefix(self.remote(), job_uuid) + s3.RESULT_FILE
        s3.s3_client(self.remote()).put_object(
            Bucket=self.bucket, Key=key, Body=json.dumps(manifest).encode()
        )


@pytest.fixture
def world(tmp_path, s3_env, bucket):
    with Sink() as sink:
        world = World(tmp_path, s3_env, bucket, sink)
        try:
            yield world
        finally:
            for app in world.apps:
                app.extensions[EXTENSION].stop()
            world.standin.close()


def reply_event(response: Any) -> Any:
    assert response.status_code == 200, response.json
    return contract.from_http(dict(response.headers), response.data)


def test_a_request_is_answered_once_its_run_exists_and_a_redelivery_byte_for_byte(world):
    app = world.app()
    data = world.request("svc-1")
    first = world.post(app, contract.JOB_REQUESTED, data)
    event = reply_event(first)
    assert event.get_type() == contract.JOB_SCHEDULED
    assert event.get_id() == "svc-1/job.scheduled"
    run = world.run_of("svc-1")
    assert contract.event_data(event)["run_id"] == run["run_id"]
    assert run["runtime_config"]["parameters"]["request_digest"]
    # Another replica, or the same after a restart: the same reply, no second run.
    again = world.post(world.app(), contract.JOB_REQUESTED, data)
    assert (again.status_code, again.data, again.headers["ce-id"]) == (
        200,
        first.data,
        first.headers["ce-id"],
    )
    assert len(fx.runs_named(world.standin, "svc-1")) == 1


def test_a_changed_redelivery_is_refused_by_a_replica_that_never_saw_the_first(world):
    """Defect 3: same job_uuid, n_epochs 2 instead of 1, and no store anywhere."""
    world.standin.state.simulation = Simulation(train_s=5)
    assert (
        world.post(world.app(), contract.JOB_REQUESTED, world.request("svc-3")).status_code == 200
    )
    changed = world.request("svc-3", n_epochs=2)
    response = world.post(world.app(), contract.JOB_REQUESTED, changed)
    assert response.status_code == 400, response.json
    assert "already requested with different content" in response.json["message"]
    assert "ce-type" not in response.headers
    assert len(fx.runs_named(world.standin, "svc-3")) == 1
    time.sleep(1)
    started = [e for e in world.sink.of("svc-3") if e["type"] == contract.JOB_STARTED]
    assert len(started) == 1, "one run, one job.started"


def test_kfp_down_is_503_with_retry_after_for_events_and_status_never_404(world):
    """Defect 2, the handler's side: a replica that lacks the job answers 503 while KFP is
    down, so nobody can read the outage as "no such job"."""
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-2")).status_code == 200
    world.standin.stop()
    try:
        other = world.app()
        for response in (
            world.post(other, contract.JOB_REQUESTED, world.request("svc-2b")),
            other.test_client().get("/jobs/svc-2"),
            other.test_client().get("/jobs"),
            world.post(other, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-2"}),
        ):
            assert response.status_code == 503, response.json
            assert response.headers["Retry-After"] == "4"
        assert other.test_client().get("/readyz").status_code == 200, "ready: the process is"
    finally:
        world.standin.start()
    assert world.app().test_client().get("/jobs/svc-2").status_code == 200
    assert world.app().test_client().get("/jobs/never-requested").status_code == 404


def test_a_notice_while_kfp_says_running_ends_the_job_by_what_it_says(world):
    """Defect 1: the train process was killed, no result.json, KFP still RUNNING (the exit
    task is part of the run): the notice's FAILED is the answer, as a routed job.failed."""
    world.standin.state.simulation = Simulation(train_s=30)
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-kill")).status_code == 200
    run = world.wait_state("svc-kill", "RUNNING")
    notice = {
        "job_uuid": "svc-kill",
        "run_id": run["run_id"],
        "state": "FAILED",
        "error": "Task finetune failed.",
    }
    first = world.post(app, contract.RUN_FINISHED, notice)
    failed = reply_event(first)
    assert failed.get_type() == contract.JOB_FAILED
    assert failed.get_id() == "svc-kill/job.failed"
    assert "finetune failed" in contract.event_data(failed)["error"]
    again = world.post(world.app(), contract.RUN_FINISHED, notice)  # the Broker redelivers
    assert again.headers["ce-id"] == first.headers["ce-id"]
    world.standin.state.terminate_run(run["run_id"])


def test_s3_down_at_notice_time_is_503_then_the_answer_once_it_is_back(world):
    """Defect 1: the notice must not be ended by a 202 while result.json cannot be read."""
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-s3")).status_code == 200
    notice = world.notice("svc-s3")["data"]
    with FaultyS3(503, "SlowDown") as faulty:
        down = world.app(S3_ENDPOINT_URL=faulty.url, AWS_MAX_ATTEMPTS="1")
        response = world.post(down, contract.RUN_FINISHED, notice)
        assert response.status_code == 503, response.json
        assert response.headers["Retry-After"] == "4"
    completed = reply_event(world.post(app, contract.RUN_FINISHED, notice))
    assert completed.get_type() == contract.JOB_COMPLETED
    data = contract.event_data(completed)
    assert data["checkpoints"][0]["path"].startswith(f"s3://{world.bucket}/")
    assert data["dataset_rows"] == 8


def test_a_cancel_racing_completion_reports_the_model(world):
    """Defect 4: result.json says completed (one checkpoint in S3) when the cancel comes: the
    job is completed, with its checkpoint, not cancelled without one."""
    world.standin.state.simulation = Simulation(train_s=30)
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-race")).status_code == 200
    world.wait_state("svc-race", "RUNNING")
    checkpoint = {
        "identifier": "llama3.2-tiny-sft-0",
        "created_at": "2026-01-02T03:04:05Z",
        "epoch": 0,
        "post_training_job_id": "svc-race",
        "path": f"s3://{world.bucket}/{fx.PREFIX}/jobs/svc-race/checkpoints/epoch_0",
    }
    world.put_manifest(
        "svc-race", {"job_uuid": "svc-race", "status": "completed", "checkpoints": [checkpoint]}
    )
    event = reply_event(world.post(app, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-race"}))
    assert event.get_type() == contract.JOB_COMPLETED
    assert contract.event_data(event)["checkpoints"] == [checkpoint]
    assert world.app().test_client().get("/jobs/svc-race").json["status"] == "completed"


def test_a_cancel_of_a_run_that_stopped_with_checkpoints_reports_them(world):
    world.standin.state.simulation = Simulation(train_s=30)
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-c2")).status_code == 200
    world.wait_state("svc-c2", "RUNNING")
    checkpoint = {
        "identifier": "c0",
        "created_at": "2026-01-02T03:04:05Z",
        "epoch": 0,
        "post_training_job_id": "svc-c2",
        "path": "s3://x/c0",
    }
    world.put_manifest(
        "svc-c2",
        {"job_uuid": "svc-c2", "status": "failed", "error": "x", "checkpoints": [checkpoint]},
    )
    world.standin.state.terminate_run(world.run_of("svc-c2")["run_id"])
    world.wait_state("svc-c2", "CANCELED")
    event = reply_event(world.post(app, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-c2"}))
    assert event.get_type() == contract.JOB_CANCELLED
    assert contract.event_data(event)["checkpoints"] == [checkpoint]


def test_cancel_terminates_and_answers_job_cancelled_once_kfp_says_canceled(world):
    world.standin.state.simulation = Simulation(train_s=60)
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-cancel")).status_code == 200
    world.wait_state("svc-cancel", "RUNNING")
    event = reply_event(world.post(app, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-cancel"}))
    assert event.get_type() == contract.JOB_CANCELLED
    assert world.run_of("svc-cancel")["state"] == "CANCELED"
    # Redelivered: the same answer, nothing else happens.
    again = reply_event(
        world.post(world.app(), contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-cancel"})
    )
    assert again.get_id() == event.get_id() == "svc-cancel/job.cancelled"


def test_a_cancel_kfp_has_not_finished_is_cancelling_and_the_tick_announces_the_end(world):
    world.standin.state.simulation = Simulation(train_s=60)
    app = world.app(KFP_TRAINER_CANCEL_WAIT_S="0")
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-slow")).status_code == 200
    world.wait_state("svc-slow", "RUNNING")
    response = world.post(app, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-slow"})
    assert response.status_code == 202, response.json
    assert response.json == {"job_uuid": "svc-slow", "status": "cancelling"}
    world.wait_state("svc-slow", "CANCELED")
    assert world.post(world.app(), contract.PING, {}).status_code == 202
    cancelled = wait_for(
        lambda: [e for e in world.sink.of("svc-slow") if e["type"] == contract.JOB_CANCELLED],
        10,
        "job.cancelled",
    )
    assert cancelled[0]["id"] == "svc-slow/job.cancelled"


def test_a_tick_announces_every_run_that_ended_in_the_last_two_periods(world):
    """Defect 1: runs that ended while no pod was up; a fresh pod's tick finds them."""
    app = world.app(KFP_TRAINER_RECONCILE_PERIOD_S="3")
    traced = {"ce-traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}  # svc-t1's caller's trace
    for job in ("svc-t1", "svc-t2"):
        headers = traced if job == "svc-t1" else {}
        reply = world.post(app, contract.JOB_REQUESTED, world.request(job), **headers)
        assert reply.status_code == 200
    for job in ("svc-t1", "svc-t2"):
        world.wait_state(job, "SUCCEEDED")
    assert all(e["type"] != contract.JOB_COMPLETED for e in world.sink.events), "no pod answered"
    fresh = world.app(KFP_TRAINER_RECONCILE_PERIOD_S="3")
    tick = world.post(fresh, contract.PING, {})
    assert tick.status_code == 202 and tick.json == {"reconciled": 2, "emitted": 2}
    for job in ("svc-t1", "svc-t2"):
        (done,) = [e for e in world.sink.of(job) if e["type"] == contract.JOB_COMPLETED]
        assert done["id"] == f"{job}/job.completed"
        assert done["data"]["checkpoints"]
    # tracing is off here, so the trace passes on as it came: from the run's parameters alone,
    # the tick's job.completed names the caller's trace, as the run's own events did
    (done,) = [e for e in world.sink.of("svc-t1") if e["type"] == contract.JOB_COMPLETED]
    assert (
        world.run_of("svc-t1")["runtime_config"]["parameters"]["traceparent"]
        == done["traceparent"]
        == traced["ce-traceparent"]
    )
    task_events = [e for e in world.sink.of("svc-t1") if e["type"] != contract.JOB_COMPLETED]
    assert {e["type"] for e in task_events} >= {contract.JOB_STARTED, contract.JOB_PROGRESS}
    assert {e["traceparent"] for e in task_events} == {traced["ce-traceparent"]}
    (untraced,) = [e for e in world.sink.of("svc-t2") if e["type"] == contract.JOB_COMPLETED]
    assert "traceparent" not in untraced
    time.sleep(6.5)  # two periods later, they are old news
    assert world.post(fresh, contract.PING, {}).json == {"reconciled": 0, "emitted": 0}


def test_status_and_pages_come_from_kfp_and_s3(world):
    app = world.app()
    for i in range(3):
        assert (
            world.post(app, contract.JOB_REQUESTED, world.request(f"svc-p{i}")).status_code == 200
        )
    world.wait_state("svc-p2", "SUCCEEDED")
    client = world.app().test_client()
    first = client.get("/jobs?page_size=2").json
    assert [j["job_uuid"] for j in first["jobs"]] == ["svc-p2", "svc-p1"]
    rest = client.get(f"/jobs?page_size=2&page_token={first['next_page_token']}").json
    assert [j["job_uuid"] for j in rest["jobs"]] == ["svc-p0"] and "next_page_token" not in rest
    status = client.get("/jobs/svc-p2").json
    contract.validate_data(contract.JOB_COMPLETED, status)
    assert status["status"] == "completed" and status["rows_without_trainable_tokens"] == 0
    assert client.get("/jobs?page_size=0").status_code == 400


def test_jobs_kfp_does_not_know_are_refused_for_good(world):
    app = world.app()
    for event_type, data, words in (
        (contract.JOB_CANCEL_REQUESTED, {"job_uuid": "svc-none"}, "nothing to cancel"),
        (contract.RUN_FINISHED, {"job_uuid": "svc-none", "state": "SUCCEEDED"}, "no run to read"),
    ):
        response = world.post(app, event_type, data)
        assert response.status_code == 400, response.json
        assert response.json["message"].startswith("unknown job 'svc-none': KFP has no run")
        assert words in response.json["message"]


def test_a_notice_from_a_run_that_lost_the_race_is_ignored(world):
    app = world.app()
    assert world.post(app, contract.JOB_REQUESTED, world.request("svc-dup")).status_code == 200
    notice = {"job_uuid": "svc-dup", "run_id": "deleted-duplicate", "state": "FAILED"}
    response = world.post(app, contract.RUN_FINISHED, notice)
    assert response.status_code == 202 and response.json["ignored"] == "deleted-duplicate"


def test_a_caller_at_its_limit_gets_429_until_one_of_its_runs_ends(world, tmp_path):
    """KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS=1 with no state of the handler's own: the count is of
    the caller's unfinished runs in KFP, by the ``caller`` parameter each run carries."""
    from tests.k8s_standin import KubeApiStandin

    world.standin.state.simulation = Simulation(train_s=60)  # runs last until cancelled
    audience = "kfp-trainer-handler"
    alice, bob = ("team-a", "requester"), ("team-b", "requester")
    with KubeApiStandin(tmp_path / "kube-api") as api:
        api.grant_token_review("system:serviceaccount:kfp-trainer:kfp-trainer-handler")
        token_file = tmp_path / "handler-token"
        token_file.write_text(api.service_account_token("kfp-trainer", "kfp-trainer-handler"))
        app = world.app(
            KFP_TRAINER_AUTH="true",
            KFP_TRAINER_AUTH_API_URL=api.url,
            KFP_TRAINER_AUTH_TOKEN_PATH=str(token_file),
            KFP_TRAINER_AUTH_CA_PATH=str(api.ca_file),
            KFP_TRAINER_AUTH_REQUESTERS=",".join(
                f"system:serviceaccount:{ns}:{name}" for ns, name in (alice, bob)
            ),
            KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS="1",
        )

        def post(who: tuple[str, str], event_type: str, data: dict[str, Any]) -> Any:
            token = api.service_account_token(*who, audiences=[audience])
            return world.post(app, event_type, data, Authorization=f"Bearer {token}")

        first = world.request("lim-r1")
        assert post(alice, contract.JOB_REQUESTED, first).status_code == 200
        params = world.run_of("lim-r1")["runtime_config"]["parameters"]
        assert params["caller"] == "system:serviceaccount:team-a:requester"
        second = world.request("lim-r2")
        refused = post(alice, contract.JOB_REQUESTED, second)
        assert (refused.status_code, refused.headers["Retry-After"]) == (429, "4")
        assert refused.json["error"] == "too_many_runs"
        assert fx.runs_named(world.standin, "lim-r2") == [], "no run for a refused request"
        assert post(alice, contract.JOB_REQUESTED, first).status_code == 200  # a redelivery
        assert post(bob, contract.JOB_REQUESTED, world.request("lim-r3")).status_code == 200
        assert post(alice, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "lim-r1"}).status_code in (
            200,
            202,
        )
        world.wait_state("lim-r1", "CANCELED")
        assert post(alice, contract.JOB_REQUESTED, second).status_code == 200
        assert world.run_of("lim-r2")["runtime_config"]["parameters"]["caller"].endswith(
            "team-a:requester"
        )
