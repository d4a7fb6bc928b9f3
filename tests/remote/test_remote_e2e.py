"""End to end, remote mode, with real training: curl -> Broker -> handler -> KFP -> S3 -> events.

The KFP stand-in runs the project's pipeline for real (kfp.local, torchtune on the tiny model);
the Broker stand-in routes by knative/triggers.yaml. Nothing polls: job.completed reaches the
completion Trigger's subscriber because the exit task's run.finished went to the Broker, which
delivered it to the handler, whose 200 reply the Broker routed on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from handler import contract
from handler.remote import s3
from handler.remote.runs import KfpRuns
from handler.settings import HandlerSettings, RemoteSettings
from tests.broker_standin import BrokerStandin
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.remote.remote_world import RemoteHandler
from tests.support.http_client import ce_headers, curl, header_args
from tests.support.loopback import wait_for
from tests.support.otlp import OtlpReceiver
from tests.support.prometheus import samples, value
from tests.support.s3 import RefusingS3
from tests.support.sink import Sink

TOKENS = ("e2e-token-first-0001", "e2e-token-second-0002", "e2e-token-third-0003")
RUN_TIMEOUT_S = 600
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"  # a caller's trace the job's spans join
CALLER_SPAN = "00f067aa0ba902b7"


class World:
    """Everything one module's tests share."""

    def __init__(self, tmp: Path, remote: RemoteSettings, token_file: Path) -> None:
        self.tmp = tmp
        self.remote = remote
        self.token_file = token_file
        self.display = Sink().__enter__()  # the completion Trigger's subscriber
        self.dead = Sink().__enter__()
        self.otlp = OtlpReceiver().__enter__()  # the collector the handler and the tasks export to
        self.standin = fx.standin_with_secrets(tmp / "standin", TOKENS[0]).start()
        self.handler: RemoteHandler | None = None
        self.handler_env: dict[str, str] = {}
        self.broker = BrokerStandin(
            {
                "kfp-trainer-handler": lambda: [self.handler.url + "/"] if self.handler else [],
                "kfp-trainer-event-display": self.display.url,
                "kfp-trainer-dead-letters": self.dead.url,
            },
            time_scale=1 / 60,
        ).__enter__()

    def runs_named(self, job_uuid: str) -> list[dict]:
        return fx.runs_named(self.standin, job_uuid)

    def event(self, job_uuid: str, short_type: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        def diagnose() -> str:
            runs = self.runs_named(job_uuid)
            logs = [self.standin.state.run_log(r["run_id"])[-3000:] for r in runs]
            return (
                f"; runs {[(r['run_id'], r['state']) for r in runs]}\nrun logs: {logs}\n"
                f"dead letters: {self.broker.dead_letters}\n"
                f"handler log tail:\n{self.handler.log_text()[-4000:] if self.handler else ''}"
            )

        return fx.wait_event(self.display, job_uuid, short_type, timeout, 0.5, diagnose)

    def send(self, event_type: str, data: dict, event_id: str, traceparent: str = "") -> int:
        """What the provider does: POST the event to the Broker, with real curl."""
        body = self.tmp / f"body-{event_id.replace('/', '_')}.json"
        body.write_text(json.dumps(data))
        headers = ce_headers(event_type, event_id, source="/tests/e2e", subject=data["job_uuid"])
        if traceparent:
            headers["ce-traceparent"] = traceparent
        status, _, _ = curl(
            "-X", "POST", *header_args(headers), "--data-binary", f"@{body}", self.broker.url
        )
        return status

    def request(self, job_uuid: str, **training) -> dict:
        data = fx.remote_request(self.remote, job_uuid, self.tmp)
        data["training_config"].update(training)
        return data

    def fine_tune_through_llama_stack(
        self, tmp_path: Path, job_uuid: str, dataset_id: str, uri: str, **stack_env: str
    ) -> tuple[dict, object]:
        """A remote-mode ``llama stack run`` (with ``stack_env``) registers ``uri`` as
        ``dataset_id`` and fine-tunes on it; (the status right after the call, the final one)."""
        from provider.client import connect

        stack = _remote_stack(self, tmp_path)
        stack.env.update(stack_env)
        stack.start()
        try:
            client = connect(stack.url, timeout=30)
            client.datasets.register(
                purpose="post-training/messages",
                source={"type": "uri", "uri": uri},
                dataset_id=dataset_id,
            )
            training = self.request("unused")["training_config"]
            training["data_config"]["dataset_id"] = dataset_id
            client.post_training.supervised_fine_tune(
                job_uuid=job_uuid,
                model="llama3.2-tiny",
                training_config=training,
                algorithm_config=self.request("unused")["algorithm_config"],
                hyperparam_search_config={},
                logger_config={},
            )
            first = client.post_training.job.status(job_uuid=job_uuid).to_dict()

            def done():
                status = client.post_training.job.status(job_uuid=job_uuid)
                return status if status.status in ("completed", "failed", "cancelled") else None

            final = wait_for(done, RUN_TIMEOUT_S, "the provider's status to end", every=1.0)
            assert final.status == "completed", (final, stack.tail())
            return first, final
        finally:
            stack.stop()

    def result(self, job_uuid: str) -> dict:
        """The run's result.json in S3 (what the train task recorded)."""
        import boto3

        key = f"{fx.PREFIX}/jobs/{job_uuid}/result.json"
        body = boto3.client("s3", endpoint_url=self.remote.s3_endpoint_url).get_object(
            Bucket=self.remote.s3_bucket, Key=key
        )["Body"]
        return json.loads(body.read())

    def close(self) -> None:
        if self.handler is not None:
            self.handler.stop()
        self.broker.close()
        self.standin.close()
        self.display.__exit__(None, None, None)
        self.dead.__exit__(None, None, None)
        self.otlp.__exit__(None, None, None)


@contextlib.contextmanager
def running_world(
    tmp: Path, moto_url: str, bucket: str, env: Callable[[World], dict[str, str]]
) -> Iterator[World]:
    """A World whose remote handler runs with the base env, the world's KFP and Broker, and
    ``env(world)``."""
    mp = pytest.MonkeyPatch()
    remote, token_file, base_env = fx.remote_setup(tmp, moto_url, bucket, TOKENS[0], mp)
    world = World(tmp, remote, token_file)
    try:
        world.handler_env = {
            **base_env,
            "KFP_HOST": world.standin.url,
            # No KFP_TRAINER_MODEL_STORE: remote mode's default (upload-model's place) serves.
            "K_SINK": world.broker.url,
            **env(world),
        }
        world.handler = RemoteHandler(world.handler_env, tmp / "handler.log").start()
        yield world
    finally:
        world.close()
        mp.undo()


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_url):
    def env(world: World) -> dict[str, str]:
        return {
            "KFP_EXPERIMENT": "e2e",
            "KFP_TRAINER_RETRY_AFTER_S": "3",
            # Tracing on: the handler exports, and hands the endpoint on to the runs' tasks.
            "OTEL_EXPORTER_OTLP_ENDPOINT": world.otlp.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }

    with running_world(tmp_path_factory.mktemp("remote-e2e"), moto_url, "remote-e2e", env) as w:
        yield w


def test_curl_to_job_completed_through_the_broker(world):
    data = world.request("e2e-job-1")
    assert world.send(contract.JOB_REQUESTED, data, "req-e2e-job-1") == 202
    completed = world.event("e2e-job-1", "job.completed")
    assert completed["id"] == "e2e-job-1/job.completed"
    assert completed["source"] == "/kfp-trainer/handler"
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

    # The train task told the Broker itself that it started and how it progressed.
    started = [e for e in world.broker.of_type(contract.JOB_STARTED) if e["subject"] == "e2e-job-1"]
    progress = [
        e for e in world.broker.of_type(contract.JOB_PROGRESS) if e["subject"] == "e2e-job-1"
    ]
    assert started and started[0]["id"] == "e2e-job-1/job.started"
    assert progress and progress[-1]["data"]["progress"]["total_steps"] == 2
    for event in (*started, *progress):
        contract.validate_data(event["type"], event["data"])
        assert event["data"]["run_id"] == run["run_id"]

    status, _, body = curl(world.handler.url + "/jobs/e2e-job-1")
    assert status == 200 and json.loads(body)["status"] == "completed"
    # A redelivered request and a repeated notice: the same answers, still one run.
    assert world.send(contract.JOB_REQUESTED, data, "req-e2e-job-1") == 202
    assert world.broker.wait_idle(60)
    assert len(world.runs_named("e2e-job-1")) == 1
    assert world.broker.dead_letters == []

    # what the platform team's Prometheus sees of it: KFP and S3 calls, the job in and out
    values = samples(world.handler.url)
    assert value(values, "kfp_trainer_kfp_api_calls_total", operation="create run", outcome="ok")
    assert value(values, "kfp_trainer_kfp_api_call_duration_seconds_count", operation="create run")
    assert value(values, "kfp_trainer_s3_calls_total", operation="GetObject", outcome="ok")
    assert value(values, "kfp_trainer_jobs_submitted_total") >= 1
    assert value(values, "kfp_trainer_jobs_ended_total", state="completed") >= 1


def _ids(event: dict) -> tuple[str, str]:
    """(trace id, parent span id) of an event's ``traceparent``."""
    _, trace_id, span_id, _ = event["traceparent"].split("-")
    return trace_id, span_id


def test_one_trace_from_job_requested_to_job_completed(world, tmp_path):
    """The caller's trace runs through the handler's span, the run's parameters, the train
    task's spans and its own events, the exit task's notice and the handler's terminal reply;
    a reconcile tick re-announces the end in the same trace, read from the run alone."""
    data = world.request("e2e-job-traced", n_epochs=2, max_steps_per_epoch=1)
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    assert world.send(contract.JOB_REQUESTED, data, "req-e2e-job-traced", caller) == 202
    completed = world.event("e2e-job-traced", "job.completed")
    wait_for(
        lambda: any(s.name == "run.finished" for s in world.otlp.trace(CALLER_TRACE)),
        30,
        "the handler's run.finished span of the traced job",
    )
    trace = world.otlp.trace(CALLER_TRACE)
    spans = {s.name: s for s in trace}
    requested = spans["job.requested"]
    assert (requested.parent_span_id, requested.service) == (CALLER_SPAN, "kfp-trainer-handler")

    # the run carries the trace as parameters; its tasks (told the collector through the
    # pipeline's env: the stand-in passes no OTEL_* of its own) continue it
    [run] = world.runs_named("e2e-job-traced")
    parameters = run["runtime_config"]["parameters"]
    assert parameters["traceparent"] == f"00-{CALLER_TRACE}-{requested.span_id}-01"
    train, notify = spans["train"], spans["notify"]
    assert (train.parent_span_id, train.service) == (requested.span_id, "kfp-trainer-train")
    assert (notify.parent_span_id, notify.service) == (requested.span_id, "kfp-trainer-notify")
    epochs = [s for s in trace if s.name == "epoch"]
    assert len(epochs) == 2 and {s.parent_span_id for s in epochs} == {train.span_id}
    for name in ("fetch model", "read dataset"):
        assert spans[name].parent_span_id == train.span_id, name
    finished = spans["run.finished"]
    assert finished.parent_span_id == notify.span_id

    # every event about the job names the trace: the reply, the task's own, the terminal one
    def of(event_type: str) -> list[dict]:
        return [e for e in world.broker.of_type(event_type) if e["subject"] == "e2e-job-traced"]

    [scheduled] = of(contract.JOB_SCHEDULED)
    assert _ids(scheduled) == (CALLER_TRACE, requested.span_id)
    task_events = of(contract.JOB_STARTED) + of(contract.JOB_PROGRESS)
    assert task_events and {_ids(e) for e in task_events} == {(CALLER_TRACE, train.span_id)}
    last = of(contract.JOB_PROGRESS)[-1]["data"]["progress"]
    assert last["step"] == last["total_steps"] == 2 and last["loss"] > 0
    assert _ids(completed) == (CALLER_TRACE, finished.span_id)

    # a tick, answered by a handler that keeps nothing, continues the trace from the run
    wait_for(
        lambda: world.standin.state.get_run(run["run_id"])["state"] == "SUCCEEDED",
        60,
        "the run to end (its exit task ends after the notice)",
    )
    status, _, body = world.handler.ping(tmp_path, n=1)
    assert status == 202 and json.loads(body)["emitted"] >= 1, body
    assert world.broker.wait_idle(60)
    reconciled = wait_for(
        lambda: [s for s in world.otlp.trace(CALLER_TRACE) if s.name == "reconcile"],
        30,
        "the tick's reconcile span in the job's trace",
    )
    assert reconciled[0].parent_span_id == requested.span_id
    again = of(contract.JOB_COMPLETED)
    assert any(_ids(e) == (CALLER_TRACE, reconciled[0].span_id) for e in again), again


def test_cancel_terminates_the_run_and_job_cancelled_is_routed(world):
    data = world.request("e2e-job-cancel", n_epochs=500, max_steps_per_epoch=4)
    assert world.send(contract.JOB_REQUESTED, data, "req-e2e-job-cancel") == 202
    wait_for(
        lambda: [
            e
            for e in world.broker.of_type(contract.JOB_PROGRESS)
            if e["subject"] == "e2e-job-cancel"
        ],
        240,
        "the training to progress",
    )
    [run] = world.runs_named("e2e-job-cancel")
    assert world.send(contract.JOB_CANCEL_REQUESTED, {"job_uuid": "e2e-job-cancel"}, "c-1") == 202
    cancelled = world.event("e2e-job-cancel", "job.cancelled", timeout=60)
    assert cancelled["data"]["status"] == "cancelled"
    assert world.standin.state.wait_idle(60)
    assert world.standin.state.get_run(run["run_id"])["state"] == "CANCELED"
    assert "job.completed" not in world.display.types("e2e-job-cancel")
    # no caller trace: the job's own began at the handler, and the end names it
    job_trace = run["runtime_config"]["parameters"]["traceparent"].split("-")[1]
    assert _ids(cancelled)[0] == job_trace


def test_an_oom_killed_train_task_is_job_failed_naming_the_kill(world):
    """Defect 7 (and 1): the kernel kills the train process; the notice arrives while KFP
    still says RUNNING and no result.json exists; job.failed says what happened and what to do."""
    data = world.request("e2e-job-oom", n_epochs=500, max_steps_per_epoch=4)
    assert world.send(contract.JOB_REQUESTED, data, "req-e2e-job-oom") == 202
    wait_for(lambda: world.runs_named("e2e-job-oom"), 60, "the run")
    [run] = world.runs_named("e2e-job-oom")
    world.standin.state.oom_kill(run["run_id"], timeout=120)
    failed = world.event("e2e-job-oom", "job.failed", timeout=120)
    error = failed["data"]["error"]
    assert error.startswith("the train task failed: OOMKilled (exit code 137)"), error
    assert "KFP_TRAINER_MEMORY_LIMIT" in error
    assert "Inner task failed" not in error
    status, _, body = curl(world.handler.url + "/jobs/e2e-job-oom")
    assert status == 200 and json.loads(body)["error"] == error


def test_s3_refusing_the_train_tasks_writes_is_job_failed_naming_the_refusal(world, moto_url):
    """Defect 7: the task cannot write result.json either; the cause still gets out, through
    the container's termination message, which KFP reports as the task's error."""
    with RefusingS3(moto_url, refuse="/jobs/") as refusing:
        settings = HandlerSettings.from_env({**world.handler_env, "S3_ENDPOINT_URL": refusing.url})
        runs = KfpRuns(settings)  # a handler whose runs' tasks write through the refusing S3
        request = world.request("e2e-job-refused")
        request["model_artifact"] = {"uri": s3.model_store(world.remote) + "/llama3.2-tiny.tar"}
        runs.create(request, "d")
        failed = world.event("e2e-job-refused", "job.failed")
        assert refusing.refused, "the task's writes went through the refusing endpoint"
    error = failed["data"]["error"]
    assert error.startswith("the train task failed: "), error
    assert "AccessDenied" in error and "/jobs/e2e-job-refused/" in error
    assert "Inner task failed" not in error


def _remote_stack(world, tmp_path):
    """``llama stack run`` in remote mode against this world's handler (the broker's place)."""
    from provider.launcher import StackServer

    return StackServer(
        {
            "KFP_TRAINER_MODE": "remote",
            "KFP_TRAINER_STATE_DIR": str(tmp_path / "stack-state"),
            "KFP_TRAINER_BROKER_URL": world.broker.url,
            "KFP_TRAINER_HANDLER_URL": world.handler.url,
            "KFP_TRAINER_STATUS_REFRESH_S": "0.5",
            "S3_ENDPOINT_URL": world.remote.s3_endpoint_url,
            "S3_BUCKET": world.remote.s3_bucket,
            "S3_PREFIX": fx.PREFIX,
        },
        tmp_path,
    )


def test_provider_status_turns_completed_through_llama_stack(world, tmp_path):
    """llama-stack SDK -> provider (remote) -> handler -> KFP -> provider status completed."""
    from provider.client import connect

    stack = _remote_stack(world, tmp_path)
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
        training = world.request("unused")["training_config"]
        training["data_config"]["dataset_id"] = "remote-rows"
        client.post_training.supervised_fine_tune(
            job_uuid="e2e-provider-1",
            model="llama3.2-tiny",
            training_config=training,
            algorithm_config=world.request("unused")["algorithm_config"],
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


def test_an_s3_dataset_is_passed_by_reference_and_never_uploaded_again(world, tmp_path):
    """llama-stack SDK -> provider (remote) -> handler -> KFP: the registered s3:// CSV is the
    run's dataset itself; the train task reads it there, every cell as written."""
    import hashlib

    import boto3

    lines = ["chat_completion_input,expected_answer"]
    for i in range(20):
        lines.append(f'"[{{""role"": ""user"", ""content"": ""Agent {i}?""}}]",00{i % 10}')
    body = ("\n".join(lines) + "\n").encode()
    key = f"{fx.PREFIX}/corpora/agents.csv"
    boto3.client("s3", endpoint_url=world.remote.s3_endpoint_url).put_object(
        Bucket=world.remote.s3_bucket, Key=key, Body=body
    )
    uri = f"s3://{world.remote.s3_bucket}/{key}"
    first, status = world.fine_tune_through_llama_stack(tmp_path, "e2e-by-ref", "agents", uri)
    assert first["datasets"]["dataset"]["delivery"] == "by_reference", first
    assert status.dataset_rows == 20
    assert fx.list_keys(world.remote, f"{fx.PREFIX}/datasets/e2e-by-ref/") == []  # no copy
    (run,) = world.runs_named("e2e-by-ref")
    assert run["runtime_config"]["parameters"]["dataset_uri"] == uri
    read = world.result("e2e-by-ref")["datasets"]["dataset"]
    assert (read["uri"], read["format"], read["rows"]) == (uri, "csv", 20)
    assert read["sha256"] == hashlib.sha256(body).hexdigest()


def test_no_secret_value_in_ir_logs_or_events(world):
    secrets = (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, *TOKENS)
    runs = world.standin.state.list_runs({}).get("runs", [])
    assert runs
    sink_raw = "".join(h.__repr__() + b.decode() for h, b in world.display.raw)
    sink_raw += json.dumps(world.broker.ingested)
    handler_log = world.handler.log_text()
    assert "job scheduled" in handler_log  # the log is the real one
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
