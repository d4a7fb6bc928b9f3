"""Local mode end to end: a real ``llama stack run`` with the project's run.yaml.

The provider is loaded from providers.d, datasets are registered through the SDK (a csv file and
inline rows), jobs are submitted through the SDK (the ``kfp-trainer train`` command and direct
calls), the in-process handler runs them with KFP's local runner and real torchtune training on
the tiny model, and the statuses survive a restart of the server.

The tests in this module share one server and run in file order (the restart test is last).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.logs import COMMON_FIELDS
from provider.launcher import ROOT, StackServer
from tests.provider import server_log
from tests.support.jobs import lora, training_config
from tests.support.otlp import OtlpReceiver
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(900)

KFP_TRAINER = Path(sys.executable).with_name("kfp-trainer")


def _rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7, (i * 3) % 5
        question = json.dumps([{"role": "user", "content": f"What is {a} plus {b}?"}])
        rows.append({"chat_completion_input": question, "expected_answer": f"{a + b}"})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("stack")
    models = base / "models"
    subprocess.run(
        [str(KFP_TRAINER), "tiny-model", "--out", str(models / "llama3.2-tiny")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    train_csv = base / "train.csv"
    with train_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["chat_completion_input", "expected_answer"])
        writer.writeheader()
        writer.writerows(_rows(40))
    return {"base": base, "state": base / "state", "models": models, "train_csv": train_csv}


@pytest.fixture(scope="module")
def otlp():
    """Where every process of the stack (provider, in-process handler, tasks) sends its spans."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def sink():
    """The in-process handler also posts every event it emits here (K_SINK)."""
    with Sink() as events:
        yield events


@pytest.fixture(scope="module")
def stack(workspace, otlp, sink):
    server = StackServer(
        {
            "KFP_TRAINER_STATE_DIR": str(workspace["state"]),
            "KFP_TRAINER_MODEL_STORE": str(workspace["models"]),
            "KFP_TRAINER_LOG_FORMAT": "json",  # set: llama-stack's start-up lines too
            "KFP_TRAINER_PAGE_SIZE": "7",  # 40 csv rows -> 6 iterrows pages
            "KFP_TRAINER_PROGRESS_INTERVAL_S": "0.2",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "K_SINK": sink.url,
        },
        workspace["base"],
    )
    server.start()
    yield server
    if server.proc is not None:
        _cancel_leftovers(server)
    server.stop()


def _cancel_leftovers(server: StackServer) -> None:
    """Leave no training running after a failed test."""
    client = _client(server)
    for job in client.post_training.job.list():
        status = client.post_training.job.status(job_uuid=job.job_uuid)
        if status.status in ("scheduled", "in_progress"):
            client.post_training.job.cancel(job_uuid=job.job_uuid)


def _client(server: StackServer):
    from provider.client import connect

    return connect(server.url, timeout=30)


def _wait(client, job_uuid: str, want: set[str], timeout_s: float = 300) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.post_training.job.status(job_uuid=job_uuid)
        if status.status in want:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_uuid} not in {want} after {timeout_s}s: {status}")


def _training(dataset_id: str, steps: int = 4, epochs: int = 1, **data) -> dict:
    config = training_config(dataset_id, epochs=epochs, steps=steps, **data)
    return {**config, "max_validation_steps": 2}


# -- the provider is the external one --------------------------------------------------------


def test_provider_is_loaded_from_providers_d(stack) -> None:
    log = stack.log_file.read_text()
    spec = ROOT / "providers.d" / "remote" / "post_training" / "kfp-torchtune.yaml"
    assert f"Loaded remote provider spec for remote::kfp-torchtune from {spec}" in log
    providers = _client(stack).providers.list()
    (ours,) = [p for p in providers if p.api == "post_training"]
    assert (ours.provider_id, ours.provider_type) == ("kfp-torchtune", "remote::kfp-torchtune")
    # (ours.health is not checked: llama-stack 0.2.12's list_providers files health answers by
    # api name, then looks them up by provider id, so every provider reads "Not Implemented".)


# -- a job trained to completion through `kfp-trainer train` -----------------------------------


@pytest.fixture(scope="module")
def trained(stack, workspace) -> dict:
    client = _client(stack)
    client.datasets.register(
        purpose="post-training/messages",
        source={"type": "rows", "rows": _rows(6, offset=100)},
        dataset_id="inline-validation",
    )
    started = time.monotonic()
    out = subprocess.run(
        [
            str(KFP_TRAINER),
            "train",
            "--url",
            stack.url,
            "--dataset",
            str(workspace["train_csv"]),
            "--validation-dataset-id",
            "inline-validation",
            "--job-uuid",
            "job-a",
            "--max-steps-per-epoch",
            "3",
            "--timeout",
            "600",
            "--poll",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=700,
    )
    return {"proc": out, "seconds": time.monotonic() - started}


def test_train_command_trains_to_completed_with_a_progress_bar(trained) -> None:
    proc = trained["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job job-a (model llama3.2-tiny, dataset train)" in proc.stdout
    assert "job job-a: completed" in proc.stdout
    assert "checkpoint llama3.2-tiny-sft-0: /" in proc.stdout
    bars = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert any("step 3/3" in line for line in bars), proc.stderr
    assert bars[-1].split("  ")[-2] == "completed"


def test_status_fields_of_the_completed_job(stack, trained, workspace) -> None:
    client = _client(stack)
    status = client.post_training.job.status(job_uuid="job-a")
    assert status.status == "completed"
    assert status.scheduled_at <= status.started_at <= status.completed_at
    assert status.resources_allocated["device"] == "cpu"
    assert status.resources_allocated["peak_memory_bytes"] > 0
    assert status.dataset_rows == 40  # every csv row, across 6 pages of 7
    assert status.error is None
    (checkpoint,) = status.checkpoints
    assert checkpoint["identifier"] == "llama3.2-tiny-sft-0"
    assert checkpoint["post_training_job_id"] == "job-a"
    assert checkpoint["epoch"] == 0
    metrics = checkpoint["training_metrics"]  # a validation dataset was given
    assert metrics["epoch"] == 0 and metrics["validation_loss"] > 0 and metrics["perplexity"] > 1
    staged = workspace["state"] / "datasets" / "job-a"
    assert len((staged / "train.jsonl").read_text().splitlines()) == 40
    assert len((staged / "validation.jsonl").read_text().splitlines()) == 6


def test_artifacts_are_checkpoints_that_load(stack, trained) -> None:
    import torch

    client = _client(stack)
    artifacts = client.post_training.job.artifacts(job_uuid="job-a")
    status = client.post_training.job.status(job_uuid="job-a")
    assert artifacts.job_uuid == "job-a"
    assert artifacts.checkpoints == status.checkpoints
    from safetensors.torch import load_file

    path = Path(artifacts.checkpoints[0]["path"])
    adapter = load_file(path / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora" in key for key in adapter)
    assert all(torch.isfinite(t).all() for t in adapter.values())
    # Checkpoint.path is the merged Meta model itself: a meta-reference checkpoint_dir.
    model = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert any(key.endswith("attention.wq.weight") for key in model)
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_one_trace_from_the_fine_tune_call_to_the_checkpoint(stack, trained, otlp, sink) -> None:
    from tests.support.otlp import children

    (started,) = [
        s for s in otlp.wait_for_span("supervised_fine_tune") if s.attributes["job_uuid"] == "job-a"
    ]
    otlp.wait_for_span("job ended")
    spans = otlp.trace(started.trace_id)
    named = {s.name: s for s in spans}
    # the provider's span continues llama-stack's request span
    assert started.service == "kfp-trainer-provider" and started.parent_span_id
    accepted = named["job.requested"]
    assert accepted.parent_span_id == started.span_id
    assert named["submit"].parent_span_id == accepted.span_id
    assert named["local run"].parent_span_id == named["submit"].span_id
    train = named["train"]
    assert train.parent_span_id == named["local run"].span_id
    assert train.service == "kfp-trainer-train"
    status = _client(stack).post_training.job.status(job_uuid="job-a")
    epochs = [s for s in children(spans, train) if s.name == "epoch"]
    assert len(epochs) == len(status.checkpoints) >= 1  # one span per epoch
    for epoch in epochs:
        assert [c.name for c in children(spans, epoch)] == ["save checkpoint"]
        assert epoch.attributes["tokens"] > 0 and epoch.attributes["loss"] > 0
    reads = {s.attributes["dataset"]: s for s in children(spans, train) if s.name == "read dataset"}
    assert reads["dataset"].attributes["rows"] == 40
    assert reads["validation_dataset"].attributes["rows"] == 6
    ended = named["job ended"]
    assert ended.parent_span_id == accepted.span_id
    assert ended.attributes["status"] == "completed"
    # every event emitted for the job names the trace; the terminal one, the completion span
    events = sink.of("job-a")
    assert events and all(e["traceparent"].split("-")[1] == started.trace_id for e in events)
    (completed,) = [e for e in events if e["type"].endswith("job.completed")]
    assert completed["traceparent"].split("-")[2] == ended.span_id


def test_every_line_of_the_server_is_json(stack, trained, otlp) -> None:
    """KFP_TRAINER_LOG_FORMAT=json, through a full local fine-tune: every line on the server's
    console (stdout and stderr) and in its log file is one JSON object with the common fields
    (llama-stack's lines from its CLI's first on, uvicorn's, the provider's, the in-process
    handler's and the pipelines'); those of job-a carry its job_uuid and trace_id."""
    (started,) = [
        s for s in otlp.wait_for_span("supervised_fine_tune") if s.attributes["job_uuid"] == "job-a"
    ]
    for console, path in ((True, stack.console_log), (False, stack.log_file)):
        logged = server_log.records(path, console=console)
        loggers = {r["logger"] for r in logged}
        assert {"provider.impl", "provider.submission", "handler.service"} <= loggers, path
        assert "llama_stack.distribution.server.server" in loggers, path
        assert "llama_stack.cli.stack.run" in loggers, path
        job = [r for r in logged if r.get("job_uuid") == "job-a"]
        assert {"job accepted; staging its datasets", "job requested"} <= {r["msg"] for r in job}
        assert {r.get("trace_id") for r in job} == {started.trace_id}, path
        if console:  # uvicorn writes to the console only
            requested = [r for r in logged if r.get("path") == "/v1/post-training/job/status"]
            assert requested and {r["logger"] for r in requested} == {"uvicorn.access"}
            assert {r["status"] for r in requested} == {200}
            assert "uvicorn.error" in loggers


def test_the_training_run_log_is_json_lines_of_the_job(stack, trained, workspace, otlp) -> None:
    """The local run's log (KFP's local runner, the train and exit tasks): every line JSON with
    the common fields, job-a's job_uuid and its trace_id (inside a span or not)."""
    (started,) = [
        s for s in otlp.wait_for_span("supervised_fine_tune") if s.attributes["job_uuid"] == "job-a"
    ]
    lines = (workspace["state"] / "jobs" / "job-a" / "run.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(tuple(r)[: len(COMMON_FIELDS)] == COMMON_FIELDS for r in records)
    assert {r["job_uuid"] for r in records} == {"job-a"}
    assert "epoch finished" in {r["msg"] for r in records}
    assert {r.get("trace_id") for r in records} == {started.trace_id}


def test_list_names_the_job(stack, trained) -> None:
    jobs = [job.job_uuid for job in _client(stack).post_training.job.list()]
    assert "job-a" in jobs


# -- a second job, on an inline-rows dataset, cancelled while training ----------------------------


@pytest.fixture(scope="module")
def cancelled(stack) -> dict:
    client = _client(stack)
    client.datasets.register(
        purpose="post-training/messages",
        source={"type": "rows", "rows": _rows(30)},
        dataset_id="inline-train",
    )
    t0 = time.monotonic()
    # Far more steps than the test waits for (15 per epoch): only the cancel can end this job,
    # however fast the machine trains.
    client.post_training.supervised_fine_tune(
        job_uuid="job-b",
        model="llama3.2-tiny",
        training_config=_training("inline-train", steps=400, epochs=1000),
        algorithm_config=lora(),
        hyperparam_search_config={},
        logger_config={},
    )
    submit_s = time.monotonic() - t0
    first = client.post_training.job.status(job_uuid="job-b")
    running = _wait(client, "job-b", {"in_progress", "completed", "failed"}, timeout_s=180)
    deadline = time.monotonic() + 120
    while (running.progress or {}).get("step", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.3)
        running = client.post_training.job.status(job_uuid="job-b")
    client.post_training.job.cancel(job_uuid="job-b")
    final = _wait(client, "job-b", {"cancelled", "completed", "failed"}, timeout_s=120)
    return {"first": first, "running": running, "final": final, "submit_s": submit_s}


def test_submit_returns_before_training(cancelled) -> None:
    assert cancelled["first"].status in ("scheduled", "in_progress")
    assert cancelled["running"].status == "in_progress"
    assert cancelled["running"].progress["step"] >= 1


def test_cancelled_job_ends_cancelled(cancelled) -> None:
    final = cancelled["final"]
    assert final.status == "cancelled", final
    assert final.completed_at is not None
    assert final.checkpoints == []


# -- bad requests are client errors and the server keeps serving --------------------------------


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("unknown model", {"model": "no-such-model"}, "model: unknown model 'no-such-model'"),
        (
            "unknown dataset",
            {"training_config": _training("never-registered")},
            "dataset 'never-registered' is not registered",
        ),
        (
            "QAT",
            {"algorithm_config": {"type": "QAT", "quantizer_name": "int8", "group_size": 32}},
            "'QAT' is not supported by remote::kfp-torchtune; only 'LoRA'",
        ),
        ("LoRA rank 0", {"algorithm_config": lora(rank=0)}, "algorithm_config.rank"),
        (
            "unknown LoRA module",
            {"algorithm_config": lora(lora_attn_modules=["q_proj", "gate"])},
            "algorithm_config.lora_attn_modules[1]",
        ),
        ("QLoRA", {"algorithm_config": lora(quantize_base=True)}, "quantize_base"),
        ("checkpoint_dir", {"checkpoint_dir": "/tmp/x"}, "checkpoint_dir: not supported"),
    ],
)
def test_bad_request_is_a_client_error(stack, workspace, case, kwargs, message) -> None:
    from llama_stack_client import BadRequestError

    client = _client(stack)
    client.datasets.register(
        purpose="post-training/messages",
        source={"type": "uri", "uri": str(workspace["train_csv"])},
        dataset_id="bad-requests",
    )
    job_uuid = "bad-" + case.replace(" ", "-").lower()
    request = {
        "job_uuid": job_uuid,
        "model": "llama3.2-tiny",
        "training_config": _training("bad-requests"),
        "algorithm_config": lora(),
        "hyperparam_search_config": {},
        "logger_config": {},
        **kwargs,
    }
    with pytest.raises(BadRequestError) as info:
        client.with_options(max_retries=0).post_training.supervised_fine_tune(**request)
    assert info.value.status_code == 400
    assert message in str(info.value.body), info.value.body
    assert stack.healthy()
    assert job_uuid not in [job.job_uuid for job in client.post_training.job.list()]


def test_unknown_job_is_a_clear_client_error(stack) -> None:
    from llama_stack_client import BadRequestError

    client = _client(stack).with_options(max_retries=0)
    for call in (
        client.post_training.job.status,
        client.post_training.job.artifacts,
        client.post_training.job.cancel,
    ):
        with pytest.raises(BadRequestError, match="job 'nope' not found"):
            call(job_uuid="nope")
    assert stack.healthy()


def test_a_job_uuid_in_use_with_other_settings_is_refused(stack, trained) -> None:
    from llama_stack_client import BadRequestError

    with pytest.raises(BadRequestError, match="'job-a': a job with this job_uuid already exists"):
        _client(stack).with_options(max_retries=0).post_training.supervised_fine_tune(
            job_uuid="job-a",
            model="llama3.2-tiny",
            training_config=_training("train"),
            algorithm_config=lora(),
            hyperparam_search_config={},
            logger_config={},
        )
    assert _client(stack).post_training.job.status(job_uuid="job-a").status == "completed"


def test_preference_optimize_says_not_supported(stack) -> None:
    import requests

    body = {
        "job_uuid": "dpo-1",
        "finetuned_model": "llama3.2-tiny",
        "algorithm_config": {"reward_scale": 1, "reward_clip": 1, "epsilon": 0.1, "gamma": 0.9},
        "training_config": _training("train"),
        "hyperparam_search_config": {},
        "logger_config": {},
    }
    reply = requests.post(
        stack.url + "/v1/post-training/preference-optimize", json=body, timeout=30
    )
    assert reply.status_code == 501
    assert "preference_optimize (DPO) is not supported by remote::kfp-torchtune" in reply.text
    assert stack.healthy()


# -- restart: the provider's state is persisted ----------------------------------------------------


def test_statuses_survive_a_server_restart(stack, trained, cancelled) -> None:
    client = _client(stack)
    before = {j: client.post_training.job.status(job_uuid=j) for j in ("job-a", "job-b")}
    assert stack.stop() is not None
    stack.start()
    client = _client(stack)
    jobs = [job.job_uuid for job in client.post_training.job.list()]
    assert jobs[:2] == ["job-a", "job-b"]
    after = {j: client.post_training.job.status(job_uuid=j) for j in ("job-a", "job-b")}
    assert after["job-a"].status == "completed"
    assert after["job-b"].status == "cancelled"
    for job in ("job-a", "job-b"):
        assert after[job].to_dict() == before[job].to_dict()
    path = Path(after["job-a"].checkpoints[0]["path"])
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
