"""The event contract shared by provider/ and handler/: types, payload schemas, ids, wire encoding.

Everything that crosses a process boundary as a CloudEvent is defined here once. The provider
imports this module instead of re-typing it; docs/events.md describes the same things for humans
and the JSON Schemas under ``handler/schemas/`` are the machine-readable truth for both.

Wire encoding goes through ``cloudevents.core.bindings.http``; this module only supplies the
attributes, the data and the rules (deterministic ids, required subject, schema validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any, Final

import jsonschema
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

PREFIX: Final = "io.llamastack.posttraining."

# Consumed by the handler through the broker: requests, cancels and the exit task's notice.
JOB_REQUESTED: Final = PREFIX + "job.requested"
JOB_CANCEL_REQUESTED: Final = PREFIX + "job.cancel.requested"
RUN_FINISHED: Final = PREFIX + "run.finished"
# Consumed directly (a PingSource's sink is the handler): the reconcile tick.
PING: Final = "dev.knative.sources.ping"

# Emitted by the handler; every one carries the job.status.json shape.
JOB_SCHEDULED: Final = PREFIX + "job.scheduled"
JOB_STARTED: Final = PREFIX + "job.started"
JOB_PROGRESS: Final = PREFIX + "job.progress"
JOB_COMPLETED: Final = PREFIX + "job.completed"
JOB_FAILED: Final = PREFIX + "job.failed"
JOB_CANCELLED: Final = PREFIX + "job.cancelled"

BROKER_CONSUMED_TYPES: Final = (JOB_REQUESTED, JOB_CANCEL_REQUESTED, RUN_FINISHED)
CONSUMED_TYPES: Final = (*BROKER_CONSUMED_TYPES, PING)
EMITTED_TYPES: Final = (
    JOB_SCHEDULED,
    JOB_STARTED,
    JOB_PROGRESS,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELLED,
)
TERMINAL_TYPES: Final = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED)

JSON_FORMAT: Final = JSONFormat()
# job_uuid values the schema's character class allows but the contract refuses.
_DOT_SEGMENTS: Final = (".", "..")
JSON_CONTENT_TYPE: Final = "application/json"
# The CloudEvents distributed-tracing extension: the W3C Trace Context of the event's job.
TRACE_ATTRIBUTES: Final = ("traceparent", "tracestate")


class JobStatus(StrEnum):
    """Job states, spelled as llama-stack's ``JobStatus`` values."""

    scheduled = "scheduled"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


STATUS_EVENT_TYPE: Final[dict[JobStatus, str]] = {
    JobStatus.completed: JOB_COMPLETED,
    JobStatus.failed: JOB_FAILED,
    JobStatus.cancelled: JOB_CANCELLED,
}

# Which schema validates the data of which event type.
_SCHEMA_FILE: Final[dict[str, str]] = {
    JOB_REQUESTED: "job.requested.json",
    JOB_CANCEL_REQUESTED: "job.cancel.requested.json",
    RUN_FINISHED: "run.finished.json",
    **{t: "job.status.json" for t in EMITTED_TYPES},
}


class ContractError(ValueError):
    """An event or payload that breaks the contract; ``problems`` lists every violation found.

    Each problem names the attribute or field path and the offending value, so a 400 body built
    from ``str(error)`` tells the sender exactly what to fix.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class UnknownEventTypeError(ContractError):
    """The event type is not one this endpoint consumes."""


def event_id(job_uuid: str, event_type: str, seq: int | None = None) -> str:
    """Deterministic event id: redeliveries and replays of the same fact share it.

    ``source`` plus ``id`` is the consumer's dedupe key. Progress events carry their step in
    ``seq`` so each step is its own fact.

    >>> event_id("job-1", JOB_COMPLETED)
    'job-1/job.completed'
    >>> event_id("job-1", JOB_PROGRESS, 7)
    'job-1/job.progress/7'
    """
    short = event_type.removeprefix(PREFIX)
    return f"{job_uuid}/{short}" if seq is None else f"{job_uuid}/{short}/{seq}"


def timestamp(value: datetime | None) -> str | None:
    """The contract's one time format: UTC, RFC 3339 with a Z, millisecond precision.

    >>> timestamp(datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC))
    '2026-01-02T03:04:05.678Z'
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """Now, in the contract's one time format (:func:`timestamp`)."""
    return timestamp(datetime.now(UTC)) or ""


_PROGRESS_KEYS: Final = {
    "step": int,
    "total_steps": int,
    "epoch": int,
    "loss": (int, float),
    "lr": (int, float),
    "grad_norm": (int, float),
    # every finished epoch's report: tokens/s, peak memory and the settings that shaped them
    "epochs": list,
}


def epoch_reports(progress: dict[str, Any] | None) -> int:
    """How many epoch reports ``progress`` carries: a record with one more is announced at once."""
    return len((progress or {}).get("epochs") or ())


def progress_fields(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The contract's progress fields of ``raw``, anything mistyped dropped (None if none)."""
    if not raw:
        return None
    out = {
        k: raw[k]
        for k, kind in _PROGRESS_KEYS.items()
        if isinstance(raw.get(k), kind) and not isinstance(raw.get(k), bool)
    }
    return out or None


def status_data(
    job_uuid: str,
    status: JobStatus,
    *,
    run_id: str | None = None,
    scheduled_at: str | None = None,
    started_at: str | None = None,
    completed_at: str | None = None,
    progress: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The job.status.json shape, built in one place: what ``GET /jobs/<id>`` answers and every
    emitted event carries. ``result`` is pipelines' RunResult dict (checkpoints, resources, rows).
    """
    result = result or {}
    return {
        "job_uuid": job_uuid,
        "status": status.value,
        "run_id": run_id,
        "scheduled_at": scheduled_at,
        "started_at": started_at,
        "completed_at": completed_at,
        "progress": progress,
        "checkpoints": list(result.get("checkpoints") or []),
        "resources_allocated": result.get("resources_allocated"),
        "dataset_rows": result.get("dataset_rows"),
        "rows_without_trainable_tokens": result.get("rows_without_trainable_tokens"),
        "error": error,
    }


@cache
def schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema for an event type's data (loaded once from the package)."""
    try:
        name = _SCHEMA_FILE[event_type]
    except KeyError:
        raise UnknownEventTypeError([f"unknown event type {event_type!r}"]) from None
    text = resources.files("handler").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _fast_validator(event_type: str) -> Any:
    """A compiled validator for the common, valid case (about 20x faster than jsonschema).

    It is at least as strict as the Draft 2020-12 validator for our schemas (no keyword they use
    differs between draft 7 and 2020-12; formats are not checked by either), so "valid" here
    means valid; anything it rejects is re-validated by jsonschema, whose messages we report.
    """
    try:
        import fastjsonschema
    except ImportError:  # optional speed-up: jsonschema alone gives the same answers
        return None
    body = {k: v for k, v in schema(event_type).items() if k != "$schema"}
    return fastjsonschema.compile(body, use_formats=False)


def _path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "(data)"


def validate_data(event_type: str, data: Any) -> dict[str, Any]:
    """Validate an event's data against its schema plus the rules a schema cannot say.

    :raises ContractError: listing every problem, each naming the field path and value.
    :return: the data, unchanged, once it is known to be valid.
    """
    if not isinstance(data, dict):
        raise ContractError([f"data must be a JSON object, got {type(data).__name__}"])
    explained = _dot_segment(data)
    if event_type == JOB_REQUESTED:
        explained += _unsupported_training(data)
    fast = None if explained else _fast_validator(event_type)
    if fast is not None:
        try:
            fast(data)
            return data
        except ValueError:  # fastjsonschema.JsonSchemaException: explain it below
            pass
    problems: list[str] = [message for _, message in explained]
    validator = jsonschema.Draft202012Validator(schema(event_type))
    for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        if any(_path(err).startswith(field) for field, _ in explained):
            continue  # already explained in plain words
        problems.append(f"{_path(err)}: {err.message}")
    if problems:
        raise ContractError(problems)
    return data


def _dot_segment(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``.`` and ``..`` fit the job_uuid pattern's characters but are path segments: HTTP
    clients collapse them in ``/jobs/<job_uuid>`` and S3 keys ``jobs/<job_uuid>/`` would name
    another place, so such a job could run but never be read back."""
    job_uuid = data.get("job_uuid")
    if job_uuid not in _DOT_SEGMENTS:
        return []
    return [
        (
            "job_uuid",
            f"job_uuid: {job_uuid!r} is not allowed: '.' and '..' are path segments, so "
            "/jobs/<job_uuid> and the job's S3 keys would point somewhere else; pick another id",
        )
    ]


def _unsupported_training(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Requests llama-stack can express but this provider does not run: say so plainly."""
    algo = data.get("algorithm_config")
    if not isinstance(algo, dict):
        return []
    if algo.get("type") == "QAT":
        return [
            (
                "algorithm_config",
                "algorithm_config.type: 'QAT' is not supported; only 'LoRA' fine-tuning is",
            )
        ]
    if algo.get("quantize_base"):
        return [
            (
                "algorithm_config",
                "algorithm_config.quantize_base: QLoRA (quantize_base=true) is not supported",
            )
        ]
    return []


@dataclass(frozen=True)
class JobEvent:
    """An inbound event reduced to what the handler acts on."""

    type: str
    id: str
    source: str
    subject: str | None
    data: dict[str, Any]
    trace: dict[str, str] = field(default_factory=dict)  # traceparent, tracestate


def parse_event(event: BaseCloudEvent, accepted: tuple[str, ...] = CONSUMED_TYPES) -> JobEvent:
    """Check a decoded CloudEvent against the contract and return what the handler needs.

    :raises UnknownEventTypeError: the type is not in ``accepted``.
    :raises ContractError: the data is missing, not JSON or violates the type's schema.
    """
    event_type = event.get_type()
    if event_type not in accepted:
        raise UnknownEventTypeError(
            [f"unknown event type {event_type!r}; expected one of: {', '.join(accepted)}"]
        )
    data = event.get_data()
    if event_type == PING:
        data = data if isinstance(data, dict) else {}
    else:
        if isinstance(data, (bytes, str)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ContractError([f"data is not valid JSON: {exc}"]) from None
        validate_data(event_type, data)
        subject = event.get_subject()
        if subject is not None and subject != data["job_uuid"]:
            raise ContractError(
                [f"subject {subject!r} does not match data.job_uuid {data['job_uuid']!r}"]
            )
    return JobEvent(
        type=event_type,
        id=event.get_id(),
        source=event.get_source(),
        subject=event.get_subject(),
        data=data,
        trace=trace_of(event),
    )


def trace_of(event: BaseCloudEvent) -> dict[str, str]:
    """The event's distributed-tracing extension attributes ({} when it has none)."""
    return {k: str(v) for k in TRACE_ATTRIBUTES if (v := event.get_extension(k))}


def make_event(
    event_type: str,
    source: str,
    data: dict[str, Any],
    *,
    seq: int | None = None,
    time: datetime | None = None,
    extensions: dict[str, str] | None = None,
) -> CloudEvent:
    """Build a contract event: subject = job_uuid, deterministic id, JSON data.

    The data is validated first, so nothing off-contract ever leaves this process.

    >>> e = make_event(JOB_CANCEL_REQUESTED, "/provider", {"job_uuid": "j1"})
    >>> (e.get_id(), e.get_subject())
    ('j1/job.cancel.requested', 'j1')
    """
    validate_data(event_type, data)
    attributes: dict[str, Any] = {
        **(extensions or {}),
        "specversion": "1.0",
        "type": event_type,
        "source": source,
        "id": event_id(data["job_uuid"], event_type, seq),
        "subject": data["job_uuid"],
        "time": time or datetime.now(UTC),
        "datacontenttype": JSON_CONTENT_TYPE,
    }
    return CloudEvent(attributes, dict(data))


def to_http(event: BaseCloudEvent, *, structured: bool = False) -> ce_http.HTTPMessage:
    """Encode for HTTP: binary mode by default (what Knative brokers route replies on)."""
    if structured:
        return ce_http.to_structured(event, JSON_FORMAT)
    return ce_http.to_binary(event, JSON_FORMAT)


def from_http(headers: dict[str, str], body: bytes) -> BaseCloudEvent:
    """Decode a binary- or structured-mode HTTP message.

    :raises ContractError: the message is not a valid CloudEvent (names the attribute).
    """
    try:
        return ce_http.from_http(ce_http.HTTPMessage(headers=headers, body=body), JSON_FORMAT)
    except BaseCloudEventException as exc:
        raise ContractError([f"not a valid CloudEvent: {exc}"]) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ContractError([f"not a valid CloudEvent: {exc}"]) from None


def event_data(event: BaseCloudEvent) -> dict[str, Any]:
    """An event's data as a dict, whether it was decoded as JSON or left as bytes."""
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        return json.loads(data)
    return dict(data or {})


def event_to_dict(event: BaseCloudEvent) -> dict[str, Any]:
    """A structured-mode JSON-able view of an event, for stores, logs and tests."""
    return json.loads(JSON_FORMAT.write(event))


def event_from_dict(value: dict[str, Any]) -> BaseCloudEvent:
    """The inverse of :func:`event_to_dict`."""
    return JSON_FORMAT.read(None, json.dumps(value).encode())
