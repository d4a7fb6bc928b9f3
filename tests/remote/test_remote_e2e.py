"""End to end, remote mode: curl -> handler (gunicorn) -> KFP stand-in trains -> S3 -> events.

Nothing here polls the handler into completing a job: the remote backend has no poll interval,
so a job.completed that arrives without a PingSource tick was caused by the pipeline's
exit-handler notice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from handler import contract
from handler.remote import s3
from handler.settings import RemoteSettings
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.remote.remote_world import RemoteHandler
from tests.support.loopback import wait_for
from tests.support.sink import Sink

TOKENS = ("e2e-token-first-0001", "e2e-token-second-0002", "e2e-token-third-0003")
RUN_TIMEOUT_S = 600


class World:
    """Everything one module's tests share."""

    def __init__(self, tmp: Path, remote: RemoteSettings, token_file: Path) -> None:
        self.tmp = tmp
        self.remote = remote
        self.token_file = token_file
        self.sink = Sink().__enter__()
        self.standin = fx.standin_with_secrets(tmp / "standin", TOKENS[0]).start()
        self.handler: RemoteHandler | None = None
        self.handler_env: dict[str, str] = {}

    def runs_named(self, job_uuid: str) -> list[dict]:
        return fx.runs_named(self.standin, job_uuid)

    def event(self, job_uuid: str, short_type: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        def diagnose() -> str:
            runs = self.runs_named(job_uuid)
            logs = [self.standin.state.run_log(r["run_id"])[-3000:] for r in runs]
            return (
                f"; runs {[(r['run_id'], r['state']) for r in runs]}\nrun logs: {logs}\n"
                f"handler log tail:\n{self.handler.log_text()[-4000:] if self.handler else ''}"
            )

        return fx.wait_event(self.sink, job_uuid, short_type, timeout, 0.5, diagnose)

    def close(self) -> None:
        if self.handler is not None:
            self.handler.stop()
        self.standin.close()
        self.sink.__exit__(None, None, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_url):
    tmp = tmp_path_factory.mktemp("remote-e2e")
    mp = pytest.MonkeyPatch()
    remote, token_file, base_env = fx.remote_setup(tmp, moto_url, "remote-e2e", TOKENS[0], mp)
    world = World(tmp, remote, token_file)
    env = {
        **base_env,
        "KFP_HOST": world.standin.url,
        "KFP_EXPERIMENT": "e2e",
        # No KFP_TRAINER_MODEL_STORE: the remote backend's default (upload-model's place) serves.
        "KFP_TRAINER_SINK": world.sink.url,
        "KFP_TRAINER_RETRY_AFTER_S": "3",
    }
    try:
        world.handler_env = env
        world.handler = RemoteHandler(env, tmp / "handler.log").start()
        yield world
    finally:
        world.close()
        mp.undo()


def job_request(world: World, job_uuid: str, **training) -> dict:
    data = fx.remote_request(world.remote, job_uuid, world.tmp)
    data["training_config"].update(training)
    return data


def test_curl_to_job_completed_via_exit_handler_notice(world):
    data = job_request(world, "e2e-job-1")
    status, headers, body = world.handler.request(data, world.tmp)
    assert status == 200, body
    assert headers["ce-type"] == contract.JOB_SCHEDULED
    assert headers["ce-id"] == "e2e-job-1/job.scheduled"

    # Knative redelivers: same answer, still one run.
    again = world.handler.request(data, world.tmp)
    assert again[0] == 200 and again[1]["ce-id"] == headers["ce-id"]

    completed = world.event("e2e-job-1", "job.completed")
    assert completed["id"] == "e2e-job-1/job.completed"
    [run] = world.runs_named("e2e-job-1")
    assert "run-finished notice delivered" in world.standin.state.run_log(run["run_id"])
    checkpoints = completed["data"]["checkpoints"]
    assert checkpoints and checkpoints[0]["path"].startswith(f"s3://{world.remote.s3_bucket}/")
    assert completed["data"]["dataset_rows"] == 8
    assert completed["data"]["rows_without_trainable_tokens"] == 0
    assert completed["data"]["resources_allocated"]["device"] == "cpu"
    keys = fx.list_keys(world.remote, s3.job_prefix(world.remote, "e2e-job-1"))
    assert s3.job_prefix(world.remote, "e2e-job-1") + "result.json" in keys
    assert any("/checkpoints/" in k for k in keys)

    status, job = world.handler.job("e2e-job-1")
    assert status == 200 and job["status"] == "completed"
    assert job["run_id"] == world.runs_named("e2e-job-1")[0]["run_id"]

    # Later ticks and a repeated notice change nothing: one terminal event per job.
    assert world.handler.ping(world.tmp, 1)[0] == 202
    notice = {"job_uuid": "e2e-job-1", "state": "SUCCEEDED"}
    assert world.handler.post_event(contract.RUN_FINISHED, notice, "n-1", world.tmp)[0] == 202
    assert world.handler.request(data, world.tmp)[0] == 200
    time.sleep(2)
    assert world.sink.types("e2e-job-1").count("job.completed") == 1
    assert world.sink.types("e2e-job-1") == ["job.started", "job.completed"]
    assert len(world.runs_named("e2e-job-1")) == 1


def test_cancel_terminates_the_run_and_emits_job_cancelled(world):
    data = job_request(world, "e2e-job-cancel", n_epochs=500, max_steps_per_epoch=4)
    assert world.handler.request(data, world.tmp)[0] == 200
    world.event("e2e-job-cancel", "job.started", timeout=120)
    run = wait_for(
        lambda: [r for r in world.runs_named("e2e-job-cancel") if r["state"] == "RUNNING"],
        120,
        "the KFP run to be RUNNING",
    )[0]
    status, _, body = world.handler.cancel("e2e-job-cancel", world.tmp)
    assert status == 202, body
    # KFP reports CANCELING at once, which is final for the job: no tick needed.
    assert json.loads(body)["status"] == "cancelled"
    assert world.standin.state.get_run(run["run_id"])["state"] in ("CANCELING", "CANCELED")
    cancelled = world.event("e2e-job-cancel", "job.cancelled", timeout=60)
    assert cancelled["data"]["status"] == "cancelled"
    assert world.standin.state.wait_idle(60)
    assert world.standin.state.get_run(run["run_id"])["state"] == "CANCELED"
    assert "job.completed" not in world.sink.types("e2e-job-cancel")
    assert world.handler.job("e2e-job-cancel")[1]["status"] == "cancelled"


def test_another_replica_answers_job_status_from_kfp(world, tmp_path):
    """A replica with its own (empty) store: GET /jobs/<id> answers from KFP and S3."""
    other = RemoteHandler(
        {**world.handler_env, "KFP_TRAINER_STATE_DIR": str(tmp_path / "other-state")},
        tmp_path / "other.log",
        workers=1,
    ).start()
    try:
        status, job = other.job("e2e-job-1")
        assert status == 200, job
        assert job["status"] == "completed"
        assert job["run_id"] == world.runs_named("e2e-job-1")[0]["run_id"]
        assert job["checkpoints"][0]["path"].startswith("s3://")
        assert other.job("e2e-job-cancel")[1]["status"] == "cancelled"
        assert other.job("never-requested")[0] == 404
    finally:
        other.stop()


def test_kfp_down_answers_503_then_succeeds_once_back(world):
    data = job_request(world, "e2e-job-down")
    world.standin.stop()
    try:
        status, headers, body = world.handler.request(data, world.tmp)
        assert status == 503, body
        assert headers["retry-after"] == "3"
        assert json.loads(body)["error"] in ("unavailable", "backend_unavailable")
        assert world.handler.job("e2e-job-down")[0] == 404  # nothing half-stored
    finally:
        world.standin.start()
    status, headers, _ = world.handler.request(data, world.tmp)  # Knative's retry
    assert status == 200 and headers["ce-type"] == contract.JOB_SCHEDULED
    world.event("e2e-job-down", "job.completed")
    assert len(world.runs_named("e2e-job-down")) == 1


def test_401_rebuilds_with_fresh_token_and_a_wrong_one_is_a_clear_503(world):
    # The projected service-account token rotates: KFP accepts only the new one.
    world.standin.set_token(TOKENS[1])
    world.token_file.write_text(TOKENS[1])
    data = job_request(world, "e2e-job-rotated")
    status, _, body = world.handler.request(data, world.tmp)
    assert status == 200, body
    world.event("e2e-job-rotated", "job.completed")
    assert "rebuilding the client with a fresh one" in world.handler.log_text()

    # KFP now wants a token the file does not have: a clear error, a 503, nothing lost.
    world.standin.set_token(TOKENS[2])
    data = job_request(world, "e2e-job-badtoken")
    status, _, body = world.handler.request(data, world.tmp)
    assert status == 503, body
    problems = [
        r
        for r in world.handler.log_lines()
        if "rejected the token from service-account token file" in json.dumps(r)
    ]
    assert problems, world.handler.log_text()[-3000:]
    assert "fix the credentials" in json.dumps(problems[-1])
    world.token_file.write_text(TOKENS[2])  # the operator fixes the Secret
    assert world.handler.request(data, world.tmp)[0] == 200
    world.event("e2e-job-badtoken", "job.completed")


def test_provider_status_turns_completed_through_llama_stack(world, tmp_path):
    """llama-stack SDK -> provider (remote) -> handler -> KFP -> provider status completed."""
    from provider.client import connect
    from provider.launcher import StackServer

    stack = StackServer(
        {
            "KFP_TRAINER_MODE": "remote",
            "KFP_TRAINER_STATE_DIR": str(tmp_path / "stack-state"),
            "KFP_TRAINER_BROKER_URL": world.handler.url + "/",
            "KFP_TRAINER_HANDLER_URL": world.handler.url,
            "KFP_TRAINER_STATUS_REFRESH_S": "0.5",
            "S3_ENDPOINT_URL": world.remote.s3_endpoint_url,
            "S3_BUCKET": world.remote.s3_bucket,
            "S3_PREFIX": fx.PREFIX,
        },
        tmp_path,
    )
    stack.start()
    try:
        client = connect(stack.url, timeout=30)
        rows = [
            {
                "chat_completion_input": json.dumps([{"role": "user", "content": f"{i} + {i}?"}]),
                "expected_answer": str(2 * i),
            }
            for i in range(10)
        ]
        client.datasets.register(
            purpose="post-training/messages",
            source={"type": "rows", "rows": rows},
            dataset_id="remote-rows",
        )
        training = job_request(world, "unused")["training_config"]
        training["data_config"]["dataset_id"] = "remote-rows"
        client.post_training.supervised_fine_tune(
            job_uuid="e2e-provider-1",
            model="llama3.2-tiny",
            training_config=training,
            algorithm_config=job_request(world, "unused")["algorithm_config"],
            hyperparam_search_config={},
            logger_config={},
        )

        def done():
            status = client.post_training.job.status(job_uuid="e2e-provider-1")
            return status if status.status in ("completed", "failed", "cancelled") else None

        status = wait_for(done, RUN_TIMEOUT_S, "the provider's status to end", every=1.0)
        assert status.status == "completed", (status, stack.tail())
        assert status.dataset_rows == 10  # the rows the provider streamed to S3
        assert status.checkpoints[0]["path"].startswith(f"s3://{world.remote.s3_bucket}/")
        artifacts = client.post_training.job.artifacts(job_uuid="e2e-provider-1")
        assert artifacts.checkpoints == status.checkpoints
        assert world.event("e2e-provider-1", "job.completed", timeout=30)
        assert len(world.runs_named("e2e-provider-1")) == 1
        stack_log = stack.tail(100_000)
        assert "e2e-provider-1" in stack_log
        for secret in (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, *TOKENS):
            assert secret not in stack_log
    finally:
        stack.stop()


def test_no_secret_value_in_ir_logs_or_events(world):
    secrets = (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, *TOKENS)
    runs = world.standin.state.list_runs({}).get("runs", [])
    assert runs
    sink_raw = "".join(h.__repr__() + b.decode() for h, b in world.sink.raw)
    handler_log = world.handler.log_text()
    assert "job ended" in handler_log  # the log is the real one
    for run in runs:
        submitted = json.dumps([run["pipeline_spec"], run["runtime_config"]])
        run_log = world.standin.state.run_log(run["run_id"])
        for secret in secrets:
            assert secret not in submitted, f"secret in the IR of {run['display_name']}"
            assert secret not in run_log, f"secret in the task log of {run['display_name']}"
    for secret in secrets:
        assert secret not in handler_log
        assert secret not in sink_raw
    # ... while the train task did get its S3 credentials, from the Secret only.
    platform = world.standin.state.platform_spec(runs[0]["run_id"])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [e["secretName"] for x in executors.values() for e in x.get("secretAsEnv", [])] == [
        fx.S3_SECRET
    ]
