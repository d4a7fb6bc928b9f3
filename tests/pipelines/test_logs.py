"""pipelines.logs: the one JSON line format, its context fields and the plain-line adapter."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from pipelines import logs


@pytest.fixture
def captured() -> io.StringIO:
    """A ``pipelines`` logger writing JSON lines into a buffer (restored afterwards)."""
    buffer = io.StringIO()
    logs.set_job(None)  # a task entry point run in this process may have named its job
    logger = logging.getLogger("pipelines.test_logs")
    handler = logs.json_handler(buffer)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield buffer
    logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_common_fields_come_first_and_extras_follow(captured) -> None:
    log = logging.getLogger("pipelines.test_logs")
    logs.event(log, "rows read", job_uuid="j-1", rows=3, name="train")
    (line,) = lines(captured)
    assert list(line)[:4] == list(logs.COMMON_FIELDS)
    assert (line["level"], line["logger"], line["msg"]) == (
        "INFO",
        "pipelines.test_logs",
        "rows read",
    )
    assert line["ts"].endswith("+00:00")
    # a field logging reserves ("name") is kept under another key rather than refused
    assert (line["job_uuid"], line["rows"], line["name_"]) == ("j-1", 3, "train")
    assert "trace_id" not in line and "span_id" not in line


def test_job_context_and_active_span_are_on_every_line(captured) -> None:
    log = logging.getLogger("pipelines.test_logs")
    tracer = TracerProvider().get_tracer("test")
    with logs.job_context("j-2"), tracer.start_as_current_span("work") as span:
        log.warning("inside")
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("failed")
    log.info("outside")
    inside, failed, outside = lines(captured)
    context = span.get_span_context()
    assert inside["job_uuid"] == failed["job_uuid"] == "j-2"
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert failed["level"] == "ERROR" and "ValueError: broken" in failed["exc"]
    assert "job_uuid" not in outside and "trace_id" not in outside


def test_a_call_names_its_own_job_over_the_context(captured) -> None:
    with logs.job_context("j-3"):
        logs.event(logging.getLogger("pipelines.test_logs"), "other", job_uuid="j-4")
    assert lines(captured)[0]["job_uuid"] == "j-4"


def test_plain_lines_become_records_and_json_lines_pass_through() -> None:
    target, records = io.StringIO(), io.StringIO()
    logger = logging.getLogger("pipelines.test_logs.kfp")
    handler = logs.json_handler(records)
    logger.addHandler(handler)
    try:
        stream = logs.JsonLineStream(target, logger)
        stream.write("\x1b[96m12:00:01.250 - WARNING - Task 'train' \x1b[0mfinished\n\n")
        stream.write('{"msg": "from a task", "level": "INFO"}\n[1, 2]\nno newline')
        stream.flush()
    finally:
        logger.removeHandler(handler)
    assert target.getvalue() == '{"msg": "from a task", "level": "INFO"}\n'
    plain = lines(records)
    assert [(r["level"], r["msg"]) for r in plain] == [
        ("WARNING", "Task 'train' finished"),
        ("INFO", "[1, 2]"),
        ("INFO", "no newline"),
    ]


def test_a_task_process_names_its_jobs_trace_outside_its_spans(captured) -> None:
    """A line a library writes after the task's span ended still names the job and its trace."""
    log = logging.getLogger("pipelines.test_logs")
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    tracer = TracerProvider().get_tracer("test")
    try:
        logs.set_job("j-3", {"traceparent": f"00-{trace_id}-{parent}-01"})
        log.info("before the span")
        with tracer.start_as_current_span("train") as span:
            log.info("inside")
        logs.set_job("j-4", {"traceparent": "00-not-a-trace-01"})
        log.info("a bad traceparent names no trace")
    finally:
        logs.set_job(None)
    before, inside, bad = lines(captured)
    assert (before["job_uuid"], before["trace_id"]) == ("j-3", trace_id)
    assert "span_id" not in before
    assert inside["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert bad["job_uuid"] == "j-4" and "trace_id" not in bad
