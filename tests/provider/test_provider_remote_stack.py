"""Remote mode through a real ``llama stack run``: datasets to S3, events to a broker over HTTP.

The project's run.yaml with KFP_TRAINER_MODE=remote; S3 is a moto server, the broker and the
handler's status route are loopback HTTP servers the test scripts. (The handler and KFP side of
remote mode is tested end to end in tests/remote/.)
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from provider.launcher import StackServer
from tests.provider.loopback import LoopbackServer, Received, Scripted
from tests.support.jobs import lora
from tests.support.loopback import closed_port_url

pytestmark = pytest.mark.timeout(300)


def _csv(path, n: int):
    lines = ["chat_completion_input,expected_answer"]
    for i in range(n):
        lines.append(f'"[{{""role"": ""user"", ""content"": ""q{i}""}}]",answer {i}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _training(dataset_id: str) -> dict:
    return {
        "n_epochs": 1,
        "max_steps_per_epoch": 2,
        "data_config": {
            "dataset_id": dataset_id,
            "batch_size": 2,
            "shuffle": False,
            "data_format": "instruct",
        },
    }


def _remote_stack(tmp_path, broker: str, handler: str, s3: str, **env: str) -> StackServer:
    """``llama stack run`` in remote mode on these endpoints, bucket ``ptrain``; not started."""
    return StackServer(
        {
            "KFP_TRAINER_MODE": "remote",
            "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
            "KFP_TRAINER_BROKER_URL": broker,
            "KFP_TRAINER_HANDLER_URL": handler,
            "S3_ENDPOINT_URL": s3,
            "S3_BUCKET": "ptrain",
            **env,
        },
        tmp_path,
    )


def _register_train(client, tmp_path, rows: int) -> None:
    """A csv dataset of ``rows`` rows registered as ``train``."""
    client.datasets.register(
        purpose="post-training/messages",
        source={"type": "uri", "uri": str(_csv(tmp_path / "train.csv", rows))},
        dataset_id="train",
    )


def _fine_tune(client, job_uuid: str) -> None:
    client.post_training.supervised_fine_tune(
        job_uuid=job_uuid,
        model="llama3.2-tiny",
        training_config=_training("train"),
        algorithm_config=lora(lora_attn_modules=["q_proj"]),
        hyperparam_search_config={},
        logger_config={},
    )


def _posted(broker: LoopbackServer, count: int, timeout_s: float = 30.0) -> list[Received]:
    """The broker's first ``count`` requests, once that many arrived (staging runs behind the
    call)."""
    deadline = time.monotonic() + timeout_s
    while len(broker.received) < count:
        assert time.monotonic() < deadline, broker.received
        time.sleep(0.05)
    return broker.received[:count]


def _wait(client, job_uuid: str, want: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.post_training.job.status(job_uuid=job_uuid)
        if status.status == want or time.monotonic() > deadline:
            return status
        time.sleep(0.3)


def test_remote_mode_stages_to_s3_posts_events_and_reads_the_handler(s3_endpoint, tmp_path) -> None:
    import boto3

    from provider.client import connect

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="ptrain")
    views: dict[str, dict] = {}

    def broker_reply(request: Received) -> Scripted:
        data = json.loads(request.body)
        kind = {k.lower(): v for k, v in request.headers.items()}["ce-type"]
        if data["job_uuid"] == "r-bad" and kind.endswith(".job.requested"):
            return Scripted(400, b'{"error":"rejected","message":"model artifact not found"}')
        return Scripted(202)

    outage: set[str] = set()  # jobs whose GET the handler answers 503 (KFP down)

    def handler_reply(request: Received) -> Scripted:
        if request.path == "/readyz":
            return Scripted(200, b"{}")
        job = request.path.rsplit("/", 1)[-1]
        if job in outage:
            return Scripted(503, b'{"error":"backend_unavailable","message":"retry later"}')
        if job in views:
            return Scripted(
                200, json.dumps(views[job]).encode(), {"Content-Type": "application/json"}
            )
        return Scripted(404, b'{"error":"not_found","message":"unknown job"}')

    with (
        LoopbackServer(responder=broker_reply) as broker,
        LoopbackServer(responder=handler_reply) as handler,
    ):
        server = _remote_stack(
            tmp_path,
            broker.url + "/ns/default",
            handler.url,
            s3_endpoint,
            KFP_TRAINER_STATUS_REFRESH_S="0",
            KFP_TRAINER_LOST_AFTER_S="3",
            KFP_TRAINER_DELIVERY_BACKOFF_S="0.05",
            S3_PREFIX="team",
        )
        server.start()
        try:
            client = connect(server.url, timeout=30).with_options(max_retries=0)
            _register_train(client, tmp_path, 30)

            # 1. job.requested: dataset streamed to S3 behind the call, then POSTed in binary mode
            views["r-1"] = {"job_uuid": "r-1", "status": "scheduled"}
            _fine_tune(client, "r-1")
            (posted,) = _posted(broker, 1)
            headers = {k.lower(): v for k, v in posted.headers.items()}
            assert posted.path == "/ns/default"
            assert headers["ce-type"] == "io.llamastack.posttraining.job.requested"
            assert headers["ce-id"] == "r-1/job.requested"
            data = json.loads(posted.body)
            assert data["dataset"]["uri"] == "s3://ptrain/team/datasets/r-1/train.jsonl"
            assert data["dataset"]["rows"] == 30
            body = s3.get_object(Bucket="ptrain", Key="team/datasets/r-1/train.jsonl")[
                "Body"
            ].read()
            assert data["dataset"]["sha256"] == hashlib.sha256(body).hexdigest()
            assert len(body.splitlines()) == 30
            assert "model_artifact" not in data  # the handler resolves it from its model store

            # 2. status follows GET /jobs/r-1 while the job is not terminal
            assert client.post_training.job.status(job_uuid="r-1").status == "scheduled"
            views["r-1"] = {
                "job_uuid": "r-1",
                "status": "in_progress",
                "started_at": "2026-01-01T00:00:01Z",
                "progress": {"step": 1, "total_steps": 2, "epoch": 0, "loss": 2.5},
            }
            running = client.post_training.job.status(job_uuid="r-1")
            assert running.status == "in_progress"
            assert running.progress["step"] == 1
            checkpoint = {
                "identifier": "llama3.2-tiny-sft-0",
                "created_at": "2026-01-01T00:00:09Z",
                "epoch": 0,
                "post_training_job_id": "r-1",
                "path": "s3://ptrain/team/jobs/r-1/checkpoints/llama3.2-tiny-sft-0",
                "training_metrics": {
                    "epoch": 0,
                    "train_loss": 2.4,
                    "validation_loss": 2.6,
                    "perplexity": 13.4,
                },
            }
            views["r-1"] = {
                **views["r-1"],
                "status": "completed",
                "completed_at": "2026-01-01T00:00:10Z",
                "checkpoints": [checkpoint],
                "resources_allocated": {"device": "cuda"},
                "dataset_rows": 30,
            }
            done = client.post_training.job.status(job_uuid="r-1")
            assert done.status == "completed"
            assert done.checkpoints[0]["path"] == checkpoint["path"]
            assert done.checkpoints[0]["training_metrics"]["perplexity"] == 13.4
            artifacts = client.post_training.job.artifacts(job_uuid="r-1")
            assert artifacts.checkpoints == done.checkpoints
            asks = len(handler.received)
            client.post_training.job.status(job_uuid="r-1")
            assert len(handler.received) == asks  # terminal: no more GETs

            # 3. cancel emits job.cancel.requested; the handler's answer makes it cancelled
            views["r-3"] = {"job_uuid": "r-3", "status": "in_progress"}
            _fine_tune(client, "r-3")
            _posted(broker, 2)  # staged and submitted: the handler has it
            client.post_training.job.cancel(job_uuid="r-3")
            cancel = broker.received[-1]
            assert {k.lower(): v for k, v in cancel.headers.items()}["ce-type"] == (
                "io.llamastack.posttraining.job.cancel.requested"
            )
            assert json.loads(cancel.body) == {"job_uuid": "r-3"}
            views["r-3"] = {"job_uuid": "r-3", "status": "cancelled"}
            assert _wait(client, "r-3", "cancelled").status == "cancelled"

            # 4. the broker refuses, after staging: the job fails with its reason, and the
            #    provider announces that (job.failed, to the broker)
            _fine_tune(client, "r-bad")
            refused = _wait(client, "r-bad", "failed")
            assert refused.error == "model artifact not found"
            failed = _posted(broker, 5)[-1]
            assert {k.lower(): v for k, v in failed.headers.items()}["ce-type"] == (
                "io.llamastack.posttraining.job.failed"
            )
            assert json.loads(failed.body)["error"] == "model artifact not found"

            # 5. accepted by the broker, unknown to the handler (a 404, then a 503 outage):
            # never ended on that alone; the status says so and moves on once the handler knows
            _fine_tune(client, "r-2")
            assert client.post_training.job.status(job_uuid="r-2").status == "scheduled"
            time.sleep(3.5)  # past lost_after_s
            lost = client.post_training.job.status(job_uuid="r-2")
            assert lost.status == "scheduled"
            assert "handler has no record of job 'r-2'" in lost.error
            outage.add("r-2")
            assert client.post_training.job.status(job_uuid="r-2").status == "scheduled"
            outage.discard("r-2")
            views["r-2"] = {"job_uuid": "r-2", "status": "in_progress"}
            found = _wait(client, "r-2", "in_progress")
            assert found.error is None, "the note goes once the handler knows the job"
            views["r-2"] = {"job_uuid": "r-2", "status": "failed", "error": "real cause"}
            assert _wait(client, "r-2", "failed").error == "real cause"

            # 6. the handler goes away: status still answers from the provider's own copy
            views["r-4"] = {"job_uuid": "r-4", "status": "scheduled"}
            _fine_tune(client, "r-4")
            _posted(broker, 7)
        finally:
            server.stop()
    server.start()  # broker and handler are gone now
    try:
        client = connect(server.url, timeout=30).with_options(max_retries=0)
        statuses = {
            j.job_uuid: client.post_training.job.status(job_uuid=j.job_uuid).status
            for j in client.post_training.job.list()
        }
        assert statuses == {
            "r-1": "completed",
            "r-3": "cancelled",
            "r-2": "failed",  # from the handler's answer, not from a 404
            "r-4": "scheduled",
            "r-bad": "failed",
        }
        assert server.healthy()
    finally:
        server.stop()


def test_s3_down_while_staging_fails_the_job_naming_s3(tmp_path) -> None:
    """The user sees why (S3 did not answer) and that submitting again is right; nothing was
    submitted to the handler."""
    from provider.client import connect

    with LoopbackServer([Scripted(202)]) as broker:
        server = _remote_stack(
            tmp_path,
            broker.url,
            broker.url,
            closed_port_url(),
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        server.start()
        try:
            client = connect(server.url, timeout=60).with_options(max_retries=0)
            _register_train(client, tmp_path, 5)
            _fine_tune(client, "s3-down-1")
            failed = _wait(client, "s3-down-1", "failed", timeout_s=120)
            assert failed.error.startswith(
                "S3 did not answer while staging the dataset to "
                "s3://ptrain/llama-stack-post-training/datasets/s3-down-1/train.jsonl ("
            ), failed.error
            assert failed.error.endswith("nothing was submitted; fine-tune again once S3 answers")
            types = [
                {k.lower(): v for k, v in r.headers.items()}["ce-type"] for r in broker.received
            ]
            assert types == ["io.llamastack.posttraining.job.failed"]  # no job.requested
        finally:
            server.stop()
