"""Datasets at any size, through a real ``llama stack run`` (local mode, KFP local, torchtune).

The call returns at once and staging runs behind it, with progress in the status; a bad row
deep in a dataset fails the job naming row and column (and ``job.failed`` goes out); a cancel
stops staging; a dataset inside the allowed roots is passed by reference and reads as the same
training input as the staged copy; cell text stays as written; the client's retry of a call
is answered as the first was. Training is one step on the tiny model: the datasets are what is
under test. The tests share one server and run in file order.
"""

from __future__ import annotations

import csv
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest

from pipelines.data import add_turns, check_row, iter_rows, read_dataset, rows_digest
from provider.launcher import StackServer
from tests.support.jobs import lora, make_tiny_model, training_config
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(900)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(\d{3})?Z$")


def _row(i: int) -> dict[str, str]:
    question = json.dumps([{"role": "user", "content": f"What is {i % 7} plus {i % 5}?"}])
    return {"chat_completion_input": question, "expected_answer": str(i % 7 + i % 5)}


def _write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["chat_completion_input", "expected_answer"])
        writer.writeheader()
        writer.writerows(rows)
    return path


class SlowCsv(http.server.ThreadingHTTPServer):
    """Serves one CSV over http://127.0.0.1, each answer after ``delay_s``: a slow source that
    localfs datasetio (pandas) reads again for every page."""

    def __init__(self, body: bytes, delay_s: float) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                time.sleep(outer.delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "text/csv")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.delay_s = delay_s
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/slow.csv"

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("datasets")
    models = base / "models"
    make_tiny_model(models / "llama3.2-tiny")
    return {
        "base": base,
        "state": base / "state",
        "models": models,
        "data": base / "data",  # KFP_TRAINER_DATA_ROOTS: passed by reference
        "elsewhere": base / "elsewhere",  # outside the roots: staged
    }


@pytest.fixture(scope="module")
def tiny_tokenizer(workspace):
    from pipelines.modeling import open_base
    from pipelines.models import lookup

    spec = lookup("llama3.2-tiny")
    return open_base(workspace["models"] / "llama3.2-tiny", spec).tokenizer(spec.max_seq_len)


@pytest.fixture(scope="module")
def sink():
    with Sink() as recording:
        yield recording


@pytest.fixture(scope="module")
def stack(workspace, sink):
    server = StackServer(
        {
            "KFP_TRAINER_STATE_DIR": str(workspace["state"]),
            "KFP_TRAINER_MODEL_STORE": str(workspace["models"]),
            "KFP_TRAINER_DATA_ROOTS": str(workspace["data"]),
            "KFP_TRAINER_PROGRESS_INTERVAL_S": "0.2",
            "KFP_TRAINER_SINK": sink.url,
        },
        workspace["base"],
    )
    server.start()
    yield server
    server.stop()


def _client(server: StackServer):
    from provider.client import connect

    return connect(server.url, timeout=30)


def _register(client, dataset_id: str, source: dict, purpose: str = "post-training/messages"):
    client.datasets.register(purpose=purpose, source=source, dataset_id=dataset_id)


def _fine_tune(client, job_uuid: str, dataset_id: str, **data):
    return client.with_options(max_retries=0).post_training.supervised_fine_tune(
        job_uuid=job_uuid,
        model="llama3.2-tiny",
        training_config=training_config(dataset_id, steps=1, **data),
        algorithm_config=lora(),
        hyperparam_search_config={},
        logger_config={},
    )


def _status(client, job_uuid: str) -> dict:
    return client.post_training.job.status(job_uuid=job_uuid).to_dict()


def _wait(client, job_uuid: str, want: set[str], timeout_s: float = 400) -> dict:
    deadline = time.monotonic() + timeout_s
    status = _status(client, job_uuid)
    while status["status"] not in want and time.monotonic() < deadline:
        time.sleep(0.3)
        status = _status(client, job_uuid)
    assert status["status"] in want, status
    return status


def _result(workspace, job_uuid: str) -> dict:
    """What the train task recorded (the local backend's copy of result.json)."""
    return json.loads((workspace["state"] / "jobs" / job_uuid / "result.json").read_text())


# -- 200,000 rows: the call returns at once -----------------------------------------------------


@pytest.fixture(scope="module")
def big(stack, workspace) -> dict:
    client = _client(stack)
    path = _write_csv(workspace["elsewhere"] / "big.csv", (_row(i) for i in range(200_000)))
    _register(client, "big", {"type": "uri", "uri": str(path)})
    started = time.monotonic()
    _fine_tune(client, "big-1", "big")
    call_s = time.monotonic() - started
    seen = [_status(client, "big-1")]
    deadline = time.monotonic() + 400
    while seen[-1]["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        seen.append(_status(client, "big-1"))
    return {"call_s": call_s, "seen": seen}


def test_a_200k_row_csv_call_returns_at_once(big) -> None:
    assert big["call_s"] < 2.0, big["call_s"]
    first = big["seen"][0]
    assert first["status"] == "scheduled"
    assert first["progress"]["phase"] in ("staging", "submitting", "queued")
    assert first["datasets"]["dataset"] == {
        **first["datasets"]["dataset"],
        "dataset_id": "big",
        "delivery": "staged",
        "reader": "file",
        "format": "csv",
    }


def test_staging_progress_then_training_then_completed_with_every_row(big) -> None:
    seen = big["seen"]
    final = seen[-1]
    assert final["status"] == "completed", final
    assert final["dataset_rows"] == 200_000
    staging = [s["progress"]["rows_staged"] for s in seen if s["progress"]["phase"] == "staging"]
    assert staging == sorted(staging) and staging, "staging was never seen making progress"
    assert final["progress"]["rows_staged"] == 200_000
    assert final["progress"]["bytes_staged"] > 0
    for status in seen:  # progress present from in_progress on, counting steps
        if status["status"] != "scheduled":
            assert isinstance(status["progress"]["step"], int), status
    # counted as soon as staged: from the end of staging on, well before training ends
    after_staging = [s for s in seen if s["progress"]["phase"] != "staging"]
    assert after_staging and all(s["dataset_rows"] == 200_000 for s in after_staging)


def test_one_timestamp_format_and_no_empty_resources(big, stack) -> None:
    import requests

    raw = requests.get(
        f"{stack.url}/v1/post-training/job/status", params={"job_uuid": "big-1"}, timeout=30
    ).json()
    for key in ("scheduled_at", "started_at", "completed_at"):
        assert ISO.match(raw[key]), (key, raw[key])
    assert raw["resources_allocated"]["device"] == "cpu"
    for checkpoint in raw["checkpoints"]:
        assert ISO.match(checkpoint["created_at"]), checkpoint["created_at"]


def test_a_time_on_a_whole_second_keeps_its_milliseconds() -> None:
    """The check above, for the one instant in a thousand it would meet only by chance: pydantic
    writes a datetime on a whole second without a fraction. Encoded as llama-stack's routes do."""
    from fastapi.encoders import jsonable_encoder
    from llama_stack.apis.common.job_types import JobStatus

    from provider.impl import KfpJobArtifactsResponse, KfpJobStatusResponse, to_checkpoint

    whole = "2026-12-04T21:22:15Z"
    checkpoint = to_checkpoint(
        {
            "identifier": "c",
            "created_at": whole,
            "epoch": 0,
            "post_training_job_id": "j",
            "path": "/c",
        }
    )
    status = KfpJobStatusResponse(
        job_uuid="j",
        status=JobStatus.completed,
        scheduled_at=whole,
        started_at="2026-12-04T21:22:15.000Z",
        completed_at="2026-12-04T21:22:16.123456Z",
        checkpoints=[checkpoint],
    )
    raw = jsonable_encoder(status)
    assert [raw[k] for k in ("scheduled_at", "started_at", "completed_at")] == [
        "2026-12-04T21:22:15.000Z",
        "2026-12-04T21:22:15.000Z",
        "2026-12-04T21:22:16.123Z",
    ]
    assert raw["checkpoints"][0]["created_at"] == "2026-12-04T21:22:15.000Z"
    artifacts = jsonable_encoder(KfpJobArtifactsResponse(job_uuid="j", checkpoints=[checkpoint]))
    assert artifacts["checkpoints"] == raw["checkpoints"]


# -- a bad row deep in the data ----------------------------------------------------------------


def test_a_bad_row_at_150000_fails_the_job_naming_row_and_column(stack, workspace, sink) -> None:
    client = _client(stack)

    def rows():
        for i in range(200_000):
            yield {**_row(i), "chat_completion_input": "plain text"} if i == 150_000 else _row(i)

    path = _write_csv(workspace["elsewhere"] / "bad.csv", rows())
    _register(client, "bad-at-150k", {"type": "uri", "uri": str(path)})
    started = time.monotonic()
    _fine_tune(client, "bad-1", "bad-at-150k")
    assert time.monotonic() - started < 2.0
    final = _wait(client, "bad-1", {"failed", "completed"}, timeout_s=120)
    assert final["status"] == "failed"
    assert final["error"].startswith(
        "dataset 'bad-at-150k' row 150000: chat_completion_input is not valid JSON"
    ), final["error"]
    assert final["progress"]["phase"] == "ended"
    assert 0 < final["progress"]["rows_staged"] <= 150_000
    failed = _job_failed_event(sink, "bad-1")
    assert failed["data"]["error"] == final["error"]
    assert failed["id"] == "bad-1/job.failed"
    assert not (workspace["state"] / "jobs" / "bad-1").exists()  # it never reached the handler
    assert not (workspace["state"] / "datasets" / "bad-1" / "train.jsonl").exists()


# -- cancel during staging ---------------------------------------------------------------------


def test_cancel_during_staging_ends_cancelled(stack, workspace, sink) -> None:
    client = _client(stack)
    body = _write_csv(workspace["base"] / "slow.csv", (_row(i) for i in range(20_000)))
    with SlowCsv(body.read_bytes(), delay_s=1.5) as slow:
        _register(client, "slow", {"type": "uri", "uri": slow.url})
        _fine_tune(client, "slow-1", "slow")
        status = _status(client, "slow-1")
        assert status["datasets"]["dataset"]["reader"] == "datasetio"  # http: via localfs
        deadline = time.monotonic() + 60
        while status["progress"].get("rows_staged", 0) == 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
            status = _status(client, "slow-1")
        assert status["progress"]["phase"] == "staging"
        client.post_training.job.cancel(job_uuid="slow-1")
        final = _status(client, "slow-1")
    assert final["status"] == "cancelled", final
    assert 0 < final["progress"]["rows_staged"] < 20_000
    assert final["completed_at"] is not None
    deadline = time.monotonic() + 30
    while not [e for e in sink.of("slow-1") if e["type"].endswith("job.cancelled")]:
        assert time.monotonic() < deadline, sink.of("slow-1")
        time.sleep(0.2)
    assert not (workspace["state"] / "jobs" / "slow-1").exists()


# -- by reference: the same training input, the cells as written -------------------------------


SPECIAL = [
    {
        "chat_completion_input": json.dumps([{"role": "user", "content": "Bond?"}]),
        "expected_answer": "007",
    },
    {
        "chat_completion_input": json.dumps([{"role": "user", "content": "Unknown?"}]),
        "expected_answer": "NA",
    },
    {
        "chat_completion_input": json.dumps([{"role": "user", "content": "Price?"}]),
        "expected_answer": "3.50",
    },
]


@pytest.fixture(scope="module")
def twins(stack, workspace) -> dict:
    """The same 2,000 rows by reference (inside the roots) and staged (outside them)."""
    client = _client(stack)
    rows = SPECIAL + [_row(i) for i in range(2_000 - len(SPECIAL))]
    inside = _write_csv(workspace["data"] / "twin.csv", rows)
    outside = _write_csv(workspace["elsewhere"] / "twin.csv", rows)
    _register(client, "twin-ref", {"type": "uri", "uri": f"file://{inside}"})
    _register(client, "twin-staged", {"type": "uri", "uri": str(outside)})
    _fine_tune(client, "twin-ref-1", "twin-ref")
    _fine_tune(client, "twin-staged-1", "twin-staged")
    return {
        "rows": rows,
        "inside": inside,
        "ref": _wait(client, "twin-ref-1", {"completed", "failed"}),
        "staged": _wait(client, "twin-staged-1", {"completed", "failed"}),
    }


def test_a_dataset_inside_the_roots_is_passed_by_reference(twins, workspace) -> None:
    ref = twins["ref"]
    assert ref["status"] == "completed", ref
    assert ref["datasets"]["dataset"]["delivery"] == "by_reference"
    assert ref["dataset_rows"] == 2_000
    assert not (workspace["state"] / "datasets" / "twin-ref-1").exists()  # nothing copied
    read = _result(workspace, "twin-ref-1")["datasets"]["dataset"]
    assert read["format"] == "csv" and read["rows"] == 2_000 and read["dataset"] == "twin-ref"
    assert read["uri"] == f"file://{twins['inside']}"


def test_by_reference_and_staged_are_the_same_training_input(twins, workspace, tiny_tokenizer):
    assert twins["staged"]["status"] == "completed", twins["staged"]
    assert twins["staged"]["datasets"]["dataset"]["delivery"] == "staged"
    by_ref = _result(workspace, "twin-ref-1")["datasets"]["dataset"]
    staged = _result(workspace, "twin-staged-1")["datasets"]["dataset"]
    assert by_ref["rows"] == staged["rows"] == 2_000
    assert by_ref["rows_sha256"] == staged["rows_sha256"]  # the trainer read the same turns
    assert by_ref["sha256"] != staged["sha256"]  # from a CSV and from the staged JSONL
    from pipelines.chat_format import encode

    staged_turns = read_dataset(
        workspace["state"] / "datasets" / "twin-staged-1" / "train.jsonl", "instruct"
    )
    ref_rows = list(iter_rows(twins["inside"], "csv", dataset="twin-ref"))
    for i in (0, 1, 2, 999, 1999):
        ref_turns = check_row(ref_rows[i], "instruct", dataset="twin-ref", index=i)
        assert encode(ref_turns, tiny_tokenizer, False) == encode(
            staged_turns[i], tiny_tokenizer, False
        )


def test_cell_text_reaches_the_trainer_as_written(twins, workspace) -> None:
    digest = rows_digest()
    for i, row in enumerate(twins["rows"]):
        add_turns(digest, check_row(row, "instruct", dataset="twin-ref", index=i))
    read = _result(workspace, "twin-ref-1")["datasets"]["dataset"]
    assert read["rows_sha256"] == digest.hexdigest()  # "007", "NA", "3.50" as they were
    assert [r["expected_answer"] for r in twins["rows"][:3]] == ["007", "NA", "3.50"]


def test_a_bad_row_in_a_dataset_passed_by_reference_fails_the_job_naming_it(
    stack, workspace, sink
) -> None:
    """Past the rows checked at submit, the trainer finds it (s3:// and https:// datasets are
    read by the same code): the job ends failed naming dataset id, row and column."""
    client = _client(stack)
    rows = [_row(i) for i in range(1_000)]
    rows[500] = {**rows[500], "chat_completion_input": "plain text"}
    _register(
        client,
        "bad-ref",
        {"type": "uri", "uri": str(_write_csv(workspace["data"] / "bad.csv", rows))},
    )
    _fine_tune(client, "bad-ref-1", "bad-ref")
    final = _wait(client, "bad-ref-1", {"failed", "completed"})
    assert final["status"] == "failed", final
    assert final["datasets"]["dataset"]["delivery"] == "by_reference"
    assert "dataset 'bad-ref' row 500: chat_completion_input is not valid JSON" in final["error"]
    failed = _job_failed_event(sink, "bad-ref-1")
    assert failed["data"]["error"] == final["error"]


def _job_failed_event(sink, job_uuid: str) -> dict:
    """The one job.failed the sink got for ``job_uuid``, waited for up to 30 s."""
    deadline = time.monotonic() + 30
    while not (failed := [e for e in sink.of(job_uuid) if e["type"].endswith("job.failed")]):
        assert time.monotonic() < deadline, sink.of(job_uuid)
        time.sleep(0.2)
    (event,) = failed
    return event


# -- a client's retry --------------------------------------------------------------------------


def test_the_same_call_twice_answers_the_same_and_trains_once(stack, workspace) -> None:
    from llama_stack_client import BadRequestError

    client = _client(stack)
    _register(client, "retry", {"type": "rows", "rows": [_row(i) for i in range(8)]})
    first = _fine_tune(client, "retry-1", "retry")
    again = _fine_tune(client, "retry-1", "retry")
    assert first.to_dict() == again.to_dict() == {"job_uuid": "retry-1"}
    with pytest.raises(BadRequestError) as info:
        _fine_tune(client, "retry-1", "retry", batch_size=4)
    assert "already exists with other settings" in info.value.body["detail"]
    final = _wait(client, "retry-1", {"completed", "failed"})
    assert final["status"] == "completed", final
    starts = (workspace["state"] / "jobs" / "retry-1" / "run.log").read_text()
    assert starts.count('"msg": "train task started"') == 1
    assert [j.job_uuid for j in client.post_training.job.list()].count("retry-1") == 1


# -- errors a user can act on, at submit ----------------------------------------------------------


def _question(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


@pytest.mark.parametrize(
    ("case", "source", "purpose", "message"),
    [
        (
            "missing path",
            {"type": "uri", "uri": "{elsewhere}/missing.csv"},
            "post-training/messages",
            "dataset 'e-missing-path' is registered with '{elsewhere}/missing.csv', which does not "
            "exist; register it again with the path of a CSV, JSONL or Parquet file",
        ),
        (
            "directory",
            {"type": "uri", "uri": "{elsewhere}/adir.csv"},
            "post-training/messages",
            "dataset 'e-directory' is registered with '{elsewhere}/adir.csv', which is a "
            "directory, not a file",
        ),
        (
            "purpose",
            {"type": "rows", "rows": [_row(0)]},
            "eval/question-answer",
            "dataset 'e-purpose' is registered with purpose 'eval/question-answer'; "
            "supervised_fine_tune needs 'post-training/messages'",
        ),
        (
            "boolean answer",
            {
                "type": "rows",
                "rows": [
                    _row(0),
                    {"chat_completion_input": _question("q"), "expected_answer": True},
                ],
            },
            "post-training/messages",
            "dataset 'e-boolean-answer' row 1: expected_answer must be a string (text), got true",
        ),
        (
            "plain text",
            {
                "type": "rows",
                "rows": [{"chat_completion_input": "What is 1+1?", "expected_answer": "2"}],
            },
            "post-training/messages",
            "dataset 'e-plain-text' row 0: chat_completion_input is not valid JSON",
        ),
        (
            "bad row at the top of a file",
            {"type": "uri", "uri": "{elsewhere}/top.csv"},
            "post-training/messages",
            "dataset 'e-bad-row-at-the-top-of-a-file' row 1: 'expected_answer' is empty",
        ),
    ],
)
def test_a_dataset_that_cannot_be_used_is_a_400_naming_it(
    stack, workspace, case, source, purpose, message
) -> None:
    from llama_stack_client import BadRequestError

    elsewhere = workspace["elsewhere"]
    (elsewhere / "adir.csv").mkdir(parents=True, exist_ok=True)
    _write_csv(elsewhere / "top.csv", [_row(0), {**_row(1), "expected_answer": ""}, _row(2)])
    client = _client(stack)
    dataset_id = "e-" + case.replace(" ", "-")
    if source["type"] == "uri":
        source = {**source, "uri": source["uri"].format(elsewhere=elsewhere)}
    _register(client, dataset_id, source, purpose=purpose)
    job_uuid = "e-" + case.replace(" ", "-")
    with pytest.raises(BadRequestError) as info:
        _fine_tune(client, job_uuid, dataset_id)
    assert info.value.status_code == 400
    assert message.format(elsewhere=elsewhere) in info.value.body["detail"], info.value.body
    assert job_uuid not in [j.job_uuid for j in client.post_training.job.list()]


def test_a_dialog_starting_with_a_system_message_is_a_400(stack) -> None:
    from llama_stack_client import BadRequestError

    client = _client(stack)
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    _register(client, "e-system-first", {"type": "rows", "rows": [{"dialog": json.dumps(dialog)}]})
    with pytest.raises(BadRequestError) as info:
        _fine_tune(client, "e-system-first", "e-system-first", data_format="dialog")
    assert (
        "dataset 'e-system-first' row 0: dialog must start with a user message, got 'system'"
        in info.value.body["detail"]
    )


def test_an_unreachable_http_source_fails_the_job_naming_dataset_and_url(stack) -> None:
    from tests.support.loopback import closed_port_url

    client = _client(stack)
    url = closed_port_url() + "/train.csv"
    _register(client, "e-unreachable", {"type": "uri", "uri": url})
    _fine_tune(client, "e-unreachable", "e-unreachable")
    final = _wait(client, "e-unreachable", {"failed", "completed"}, timeout_s=60)
    assert final["status"] == "failed"
    assert final["error"].startswith(
        f"dataset 'e-unreachable' ('{url}'): datasetio could not read rows from row 0 on: "
    ), final["error"]
    assert stack.healthy()


# -- a restart during staging (last: it restarts the server) ------------------------------------


def test_staging_left_half_done_by_a_restart_goes_on(stack, workspace) -> None:
    client = _client(stack)
    body = _write_csv(workspace["base"] / "slow2.csv", (_row(i) for i in range(5_000)))
    with SlowCsv(body.read_bytes(), delay_s=1.0) as slow:
        _register(client, "slow-restart", {"type": "uri", "uri": slow.url})
        _fine_tune(client, "restart-1", "slow-restart")
        status = _status(client, "restart-1")
        deadline = time.monotonic() + 60
        while status["progress"].get("rows_staged", 0) == 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
            status = _status(client, "restart-1")
        assert status["progress"]["phase"] == "staging"
        assert stack.stop() is not None
        stack.start()
        client = _client(stack)
        final = _wait(client, "restart-1", {"completed", "failed", "cancelled"})
    assert final["status"] == "completed", final
    assert final["dataset_rows"] == 5_000
    staged = workspace["state"] / "datasets" / "restart-1" / "train.jsonl"
    assert len(staged.read_text().splitlines()) == 5_000
    assert "staging the job again after a restart" in stack.tail(100_000)
