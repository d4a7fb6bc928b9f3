"""Remote path of the provider at unit level, over real HTTP on loopback.

- dataset staging streams to S3 with a multipart upload (moto server), sha256 recorded;
- job.requested is POSTed in binary mode to the broker, retried like Knative retries;
- status comes from the handler's GET /jobs/<job_uuid>.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from provider.config import KfpTrainerConfig, S3Config
from provider.s3stage import S3MultipartSink, S3Refused, S3Unavailable, dataset_key, s3_client
from provider.staging import DatasetError, stage_dataset
from provider.transport import DeliveryFailed, RequestRejected
from tests.provider.loopback import LoopbackServer, Scripted
from tests.support.jobs import lora
from tests.support.loopback import closed_port_url
from tests.support.s3 import FaultyS3, boto_client

MIB = 1024 * 1024


class RowsDatasetIO:
    """Pages over an in-memory row list with localfs' semantics (offset + limit, has_more)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    async def iterrows(self, dataset_id, start_index=None, limit=None):
        from llama_stack.providers.utils.pagination import paginate_records

        return paginate_records(self.rows, start_index, limit)


def _big_rows(n: int) -> list[dict]:
    pad = "x" * 900
    return [
        {
            "chat_completion_input": f'[{{"role": "user", "content": "q{i} {pad}"}}]',
            "expected_answer": f"a{i}",
        }
        for i in range(n)
    ]


def _s3(endpoint: str) -> S3Config:
    return S3Config(endpoint_url=endpoint, bucket="datasets", prefix="team/pt", part_size_mb=5)


def test_dataset_streams_to_s3_in_parts_with_its_sha256(s3_endpoint) -> None:
    cfg = _s3(s3_endpoint)
    client = s3_client(cfg)
    client.create_bucket(Bucket=cfg.bucket)
    rows = _big_rows(12_000)  # ~11.5 MiB -> three 5 MiB parts
    key = dataset_key(cfg, "job-42", "train")
    assert key == "team/pt/datasets/job-42/train.jsonl"
    sink = S3MultipartSink(client, cfg.bucket, key, cfg.part_size_mb * MIB)

    staged = asyncio.run(
        stage_dataset(RowsDatasetIO(rows), "big", sink, data_format="instruct", page_size=1000)
    )
    body = client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read()
    assert staged.uri == "s3://datasets/team/pt/datasets/job-42/train.jsonl"
    assert staged.rows == 12_000
    assert staged.size == len(body) > 10 * MIB
    assert staged.sha256 == hashlib.sha256(body).hexdigest()
    assert sink.parts_uploaded == 3
    assert [json.loads(line) for line in body.splitlines()] == rows


def test_a_failed_staging_aborts_the_upload(s3_endpoint) -> None:
    cfg = _s3(s3_endpoint)
    client = s3_client(cfg)
    client.create_bucket(Bucket=cfg.bucket)
    rows = _big_rows(7000)
    rows[6500]["expected_answer"] = ""  # found after a part has gone up
    sink = S3MultipartSink(client, cfg.bucket, "k/train.jsonl", 5 * MIB)
    with pytest.raises(DatasetError, match="row 6500"):
        asyncio.run(
            stage_dataset(
                RowsDatasetIO(rows),
                "bad",
                sink,
                data_format="instruct",
                page_size=500,
                page_max=500,  # pages of 500: a part is up before row 6500 is read
            )
        )
    assert sink.parts_uploaded >= 1
    assert client.list_multipart_uploads(Bucket=cfg.bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=cfg.bucket).get("KeyCount") == 0


def test_a_small_dataset_is_one_part(s3_endpoint) -> None:
    cfg = _s3(s3_endpoint)
    client = s3_client(cfg)
    client.create_bucket(Bucket=cfg.bucket)
    sink = S3MultipartSink(client, cfg.bucket, "small.jsonl", 5 * MIB)
    staged = asyncio.run(
        stage_dataset(RowsDatasetIO(_big_rows(3)), "s", sink, data_format="instruct", page_size=2)
    )
    assert staged.rows == 3
    assert sink.parts_uploaded == 1
    body = client.get_object(Bucket=cfg.bucket, Key="small.jsonl")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == staged.sha256


def _stage(sink, rows, page_size=500, datasetio=None):
    return asyncio.run(
        stage_dataset(
            datasetio or RowsDatasetIO(rows),
            "ds",
            sink,
            data_format="instruct",
            page_size=page_size,
            page_max=page_size,
        )
    )


def test_s3_down_while_staging_is_a_retryable_timeout_naming_the_uri() -> None:
    client = boto_client(closed_port_url())
    sink = S3MultipartSink(client, "datasets", "team/pt/datasets/j/train.jsonl", 5 * MIB)
    with pytest.raises(S3Unavailable) as err:
        _stage(sink, _big_rows(3))
    assert isinstance(err.value, TimeoutError)  # llama-stack: 504 with this message
    message = str(err.value)
    assert message.startswith(
        "S3 did not answer while staging the dataset to "
        "s3://datasets/team/pt/datasets/j/train.jsonl (EndpointConnectionError"
    )
    assert message.endswith("nothing was submitted; fine-tune again once S3 answers")


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_s3_not_now_while_staging_is_a_retryable_timeout(status, code) -> None:
    with FaultyS3(status, code) as s3:
        sink = S3MultipartSink(boto_client(s3.url), "datasets", "k/train.jsonl", 5 * MIB)
        with pytest.raises(S3Unavailable, match=rf"s3://datasets/k/train\.jsonl \({code}: "):
            _stage(sink, _big_rows(3))


def test_s3_refusing_the_upload_is_a_400_naming_the_bucket(s3_endpoint) -> None:
    client = s3_client(_s3(s3_endpoint))  # no bucket created
    sink = S3MultipartSink(client, "datasets", "k/train.jsonl", 5 * MIB)
    with pytest.raises(S3Refused) as err:
        _stage(sink, _big_rows(3))
    assert isinstance(err.value, ValueError) and not isinstance(err.value, TimeoutError)
    assert "S3 refused the dataset upload to s3://datasets/k/train.jsonl (NoSuchBucket" in str(
        err.value
    )
    assert "check the provider's s3 settings" in str(err.value)


def test_s3_lost_mid_upload_surfaces_that_not_the_failed_abort(s3_endpoint, caplog) -> None:
    """S3 goes away after the first part: the upload error surfaces, the abort is best effort."""
    cfg = _s3(s3_endpoint)
    client = s3_client(cfg)
    client.create_bucket(Bucket=cfg.bucket)
    sink = S3MultipartSink(client, cfg.bucket, "k/train.jsonl", 5 * MIB)
    gone = boto_client(closed_port_url())

    class S3GoesAway(RowsDatasetIO):
        async def iterrows(self, dataset_id, start_index=None, limit=None):
            if sink.parts_uploaded:
                sink._client = gone  # the endpoint stops answering from here on
            return await super().iterrows(dataset_id, start_index, limit)

    rows = _big_rows(12_000)
    with (
        caplog.at_level("WARNING", logger="provider.s3stage"),
        pytest.raises(S3Unavailable, match=r"s3://datasets/k/train\.jsonl"),
    ):
        _stage(sink, rows, datasetio=S3GoesAway(rows))
    assert sink.parts_uploaded == 1
    assert "could not abort the dataset upload" in caplog.text
    assert client.list_objects_v2(Bucket=cfg.bucket).get("KeyCount") == 0  # nothing visible


# -- broker delivery ---------------------------------------------------------------------------


def _config(broker: str, handler: str = "http://127.0.0.1:9", **kw) -> KfpTrainerConfig:
    return KfpTrainerConfig(
        mode="remote",
        broker_url=broker,
        handler_url=handler,
        s3={"bucket": "b"},
        delivery_attempts=kw.pop("attempts", 4),
        delivery_backoff_s=0.01,
        http_timeout_s=5,
        **kw,
    )


def _requested_event():
    from handler.contract import JOB_REQUESTED, make_event

    data = {
        "job_uuid": "job-7",
        "model": "llama3.2-tiny",
        "training_config": {"n_epochs": 1},
        "algorithm_config": lora(lora_attn_modules=["q_proj"]),
        "dataset": {"uri": "s3://b/p/datasets/job-7/train.jsonl", "format": "jsonl", "rows": 3},
    }
    return make_event(JOB_REQUESTED, "/llama-stack/post-training/kfp-torchtune", data)


def test_broker_post_is_binary_mode_and_retried_until_accepted() -> None:
    from provider.remote import RemoteTransport

    script = [
        Scripted(503, b'{"error":"unavailable","message":"busy"}'),
        Scripted(429, b"slow down", {"Retry-After": "0"}),
        Scripted(202),
    ]
    with LoopbackServer(script) as broker:
        transport = RemoteTransport(_config(broker.url + "/default/broker"))
        transport.start(lambda _u: None)
        assert transport.send(_requested_event()) == []
        transport.stop()
    assert len(broker.received) == 3
    first = broker.received[0]
    headers = {k.lower(): v for k, v in first.headers.items()}
    assert first.method == "POST" and first.path == "/default/broker"
    assert headers["ce-type"] == "io.llamastack.posttraining.job.requested"
    assert headers["ce-id"] == "job-7/job.requested"
    assert headers["ce-subject"] == "job-7"
    assert headers["ce-specversion"] == "1.0"
    assert headers["content-type"].startswith("application/json")
    assert json.loads(first.body)["dataset"]["uri"].startswith("s3://")
    assert all(r.body == first.body for r in broker.received)


def test_broker_client_error_is_final_and_carries_the_reason() -> None:
    from provider.remote import RemoteTransport

    body = b'{"error":"bad_request","message":"model: unknown model \'x\'"}'
    with LoopbackServer([Scripted(400, body)]) as broker:
        transport = RemoteTransport(_config(broker.url))
        with pytest.raises(RequestRejected, match="unknown model 'x'"):
            transport.send(_requested_event())
    assert len(broker.received) == 1


def test_broker_that_never_accepts_fails_after_the_configured_attempts() -> None:
    from provider.remote import RemoteTransport

    with LoopbackServer([Scripted(500, b"boom")]) as broker:
        transport = RemoteTransport(_config(broker.url, attempts=3))
        with pytest.raises(DeliveryFailed, match=r"after 3 attempts; last: HTTP 500: boom"):
            transport.send(_requested_event())
    assert len(broker.received) == 3


def test_unreachable_broker_fails_cleanly() -> None:
    from provider.remote import RemoteTransport

    transport = RemoteTransport(_config(closed_port_url() + "/", attempts=2))
    with pytest.raises(DeliveryFailed, match="after 2 attempts; last: ConnectionError"):
        transport.send(_requested_event())


def test_reply_event_from_the_broker_is_returned_as_an_update() -> None:
    from handler.contract import JOB_SCHEDULED, make_event, to_http
    from provider.remote import RemoteTransport

    reply = to_http(make_event(JOB_SCHEDULED, "/h", {"job_uuid": "job-7", "status": "scheduled"}))
    with LoopbackServer([Scripted(200, reply.body, dict(reply.headers))]) as broker:
        updates = RemoteTransport(_config(broker.url)).send(_requested_event())
    assert updates == [{"job_uuid": "job-7", "status": "scheduled"}]


def test_status_comes_from_the_handlers_jobs_route() -> None:
    from provider.remote import RemoteTransport

    view = {"job_uuid": "job-7", "status": "in_progress", "progress": {"step": 2}}
    script = [
        Scripted(200, json.dumps(view).encode(), {"Content-Type": "application/json"}),
        Scripted(404, b'{"error":"not_found"}'),
    ]
    with LoopbackServer(script) as handler:
        transport = RemoteTransport(_config("http://127.0.0.1:9", handler.url + "/"))
        assert transport.job("job-7") == view
        assert transport.job("other") is None
    assert [r.path for r in handler.received] == ["/jobs/job-7", "/jobs/other"]


def test_health_problems_come_from_the_handlers_readyz() -> None:
    from provider.remote import RemoteTransport

    script = [
        Scripted(200, b'{"status":"ready"}'),
        Scripted(
            503, b'{"error":"unavailable","message":"backend: the remote backend is not ready"}'
        ),
    ]
    with LoopbackServer(script) as handler:
        transport = RemoteTransport(_config("http://127.0.0.1:9", handler.url))
        assert transport.problems() == []
        (problem,) = transport.problems()
        assert problem.endswith("/readyz: backend: the remote backend is not ready")
    assert [r.path for r in handler.received] == ["/readyz", "/readyz"]


def test_tokens_from_the_configured_files_go_with_each_request(tmp_path) -> None:
    """The broker and the handler each get the token of their own file, read afresh every time
    (the kubelet rotates projected tokens); /readyz is open and gets none."""
    from provider.remote import RemoteTransport

    broker_token, handler_token = tmp_path / "broker-token", tmp_path / "handler-token"
    broker_token.write_text("for-the-broker-1\n")
    handler_token.write_text("for-the-handler\n")
    view = {"job_uuid": "job-7", "status": "in_progress"}
    with (
        LoopbackServer([Scripted(202)]) as broker,
        LoopbackServer(
            [Scripted(200, json.dumps(view).encode(), {"Content-Type": "application/json"})]
        ) as handler,
    ):
        transport = RemoteTransport(
            _config(
                broker.url,
                handler.url,
                broker_token_file=str(broker_token),
                handler_token_file=str(handler_token),
            )
        )
        transport.send(_requested_event())
        broker_token.write_text("for-the-broker-2")  # rotated
        transport.send(_requested_event())
        assert transport.job("job-7") == view
        assert transport.problems() == []
    assert [r.headers.get("Authorization") for r in broker.received] == [
        "Bearer for-the-broker-1",
        "Bearer for-the-broker-2",
    ]
    by_path = {r.path: r.headers.get("Authorization") for r in handler.received}
    assert by_path == {"/jobs/job-7": "Bearer for-the-handler", "/readyz": None}


def test_without_token_files_no_authorization_is_sent() -> None:
    from provider.remote import RemoteTransport

    with LoopbackServer([Scripted(202)]) as broker:
        RemoteTransport(_config(broker.url)).send(_requested_event())
    assert "Authorization" not in broker.received[0].headers


def test_an_unreadable_token_file_is_named(tmp_path) -> None:
    from provider.remote import RemoteTransport

    missing = tmp_path / "no-token"
    with LoopbackServer([Scripted(202)]) as broker:
        transport = RemoteTransport(
            _config(broker.url, broker.url, attempts=1, broker_token_file=str(missing))
        )
        with pytest.raises(
            DeliveryFailed,
            match=f"cannot read the bearer token KFP_TRAINER_BROKER_TOKEN_FILE={missing}",
        ):
            transport.send(_requested_event())
        (tmp_path / "empty").write_text("  \n")
        transport = RemoteTransport(
            _config(broker.url, broker.url, handler_token_file=str(tmp_path / "empty"))
        )
        with pytest.raises(DeliveryFailed, match="KFP_TRAINER_HANDLER_TOKEN_FILE=.* is empty"):
            transport.job("job-7")
    assert broker.received == [], "nothing is sent without the token that was asked for"
