"""pipelines.tracing: one trace through a real run, nothing recorded without an endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace

from pipelines import tracing
from tests.pipelines.pipeline_helpers import make_request, run_cli, write_rows
from tests.support.otlp import OtlpReceiver, children

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def test_a_run_continues_the_job_trace_and_reports_kfp_metrics(tmp_path: Path, tiny_model: Path):
    data = write_rows(tmp_path / "train.jsonl", 8)
    request = make_request("job-traced", str(tiny_model), str(data))
    request["training_config"].update(n_epochs=2, max_steps_per_epoch=1)
    request["trace"] = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    with OtlpReceiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "KFP_TRAINER_CACHE_DIR": str(tmp_path)}
        proc, out = run_cli(request, tmp_path / "run", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        spans = otlp.trace(CALLER_TRACE)
    assert {s.trace_id for s in otlp.received()} == {CALLER_TRACE}
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (run,) = by_name["local run"]
    assert run.parent_span_id == CALLER_SPAN and run.service == "kfp-trainer-run"
    (train,) = by_name["train"]
    (notify,) = by_name["notify"]
    assert train.parent_span_id == notify.parent_span_id == run.span_id
    assert train.service == "kfp-trainer-train" and notify.service == "kfp-trainer-notify"
    steps = {s.name for s in children(spans, train)}
    assert {"read dataset", "fetch model", "extract model", "epoch"} <= steps
    (read,) = by_name["read dataset"]
    assert read.attributes["rows"] == 8 and read.attributes["bytes"] == data.stat().st_size
    epochs = sorted(by_name["epoch"], key=lambda s: s.attributes["epoch"])
    assert [e.attributes["epoch"] for e in epochs] == [0, 1]
    result = json.loads(out.read_text())
    for epoch, metrics in zip(epochs, result["metrics"], strict=True):
        assert epoch.parent_span_id == train.span_id
        assert epoch.attributes["loss"] == metrics["train_loss"]
        assert epoch.attributes["tokens"] == metrics["tokens"] > 0
        (saved,) = children(spans, epoch)
        assert saved.name == "save checkpoint" and saved.attributes["bytes"] > 0
    # the train task's Output[Metrics]: what the KFP UI shows for the run
    (output,) = (tmp_path / "run" / "work" / "pipeline_root").glob("*/train/executor_output.json")
    (artifact,) = json.loads(output.read_text())["artifacts"]["metrics"]["artifacts"]
    shown = artifact["metadata"]
    for metrics in result["metrics"]:
        n = metrics["epoch"]
        assert shown[f"epoch{n}_train_loss"] == metrics["train_loss"]
        assert shown[f"epoch{n}_tokens_per_second"] == metrics["tokens_per_second"] > 0
    assert shown["peak_memory_bytes"] == result["resources_allocated"]["peak_memory_bytes"] > 0
    # the task's log lines name the trace and the span they were written in
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    finished = [r for r in lines if r["msg"] == "epoch finished"]
    assert [r["span_id"] for r in finished] == [e.span_id for e in epochs]
    assert {r["trace_id"] for r in finished} == {CALLER_TRACE}


def test_without_an_endpoint_nothing_is_recorded_and_the_context_passes_on() -> None:
    tracing.shutdown()
    try:
        tracing.init("test", env={})
        assert not tracing.enabled({})
        with tracing.span("test", "work", parent={"traceparent": TRACEPARENT}) as span:
            assert not span.is_recording()
            assert tracing.carrier() == {"traceparent": TRACEPARENT}
        with tracing.span("test", "orphan") as span:
            assert not span.get_span_context().is_valid
            assert tracing.carrier() == {}
    finally:
        tracing.shutdown()


def test_a_bad_traceparent_starts_no_trace() -> None:
    assert tracing.context_of({"traceparent": "00-zz-yy-01"}) is None
    assert tracing.context_of({"tracestate": "a=1"}) is None
    context = tracing.context_of({"traceparent": TRACEPARENT})
    assert f"{trace.get_current_span(context).get_span_context().span_id:016x}" == CALLER_SPAN


def test_a_span_begun_without_a_block_ends_failed_when_an_exception_leaves(monkeypatch) -> None:
    """An epoch that raises (start/end, no ``with``) is exported ended, with the error."""
    with OtlpReceiver() as otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
        tracing.shutdown()
        try:
            tracing.init("test")
            with (
                pytest.raises(FloatingPointError),
                tracing.span("test", "train", parent={"traceparent": TRACEPARENT}),
            ):
                for epoch in range(3):
                    started = tracing.start("test", "epoch", attributes={"epoch": epoch})
                    if epoch == 1:
                        raise FloatingPointError("training loss became nan at step 2")
                    tracing.end(*started, attributes={"loss": 1.5})
            assert tracing.carrier() == {}  # the context is the one before the run
            tracing.flush()
        finally:
            tracing.shutdown()
        spans = otlp.trace(CALLER_TRACE)
    (train,) = [s for s in spans if s.name == "train"]
    first, failed = sorted(children(spans, train), key=lambda s: s.attributes["epoch"])
    assert (first.status_code, first.attributes["loss"]) == (0, 1.5)
    assert failed.status_code == train.status_code == 2  # error
    assert failed.status_message == "FloatingPointError: training loss became nan at step 2"
    assert failed.end_ns >= failed.start_ns > 0
    ((name, attributes),) = failed.events
    assert name == "exception"
    assert attributes["exception.type"] == "FloatingPointError"
    assert attributes["exception.message"] == "training loss became nan at step 2"
