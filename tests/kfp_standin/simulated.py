"""A cheap way to run the project's pipeline: what its tasks do to the world, minus training.

Scenario tests submit a hundred jobs; training each for real would take an hour on this
machine, and what they test is the eventing around runs. So a stand-in made with
``KfpStandin(simulate=Simulation(...))`` runs each run in-process, like this:

- train: announces itself with the real ``pipelines.task_events`` code (job.started, one
  job.progress, progress.json); checks that the dataset exists in S3, with the credentials the
  pipeline's Secret gives the train task; waits ``train_s``; then uploads a small checkpoint and
  writes ``result.json`` as the train task does (``pipelines.result.RunResult``), or a failed
  result.json naming the missing dataset;
- the exit task: ``pipelines.notify.post_run_finished``, the real code, to the run's
  ``notify_url``, retried for ``notify_window_s`` while the run stays RUNNING.

At least one test in the suite runs the real pipeline through the same remote path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Simulation:
    """How simulated runs behave; ``train_s=None``: runs are accepted and never start (they
    stay PENDING: benchmarks of run creation alone). ``hold(job_uuid)``: while it is true, that
    job's training goes on past ``train_s`` (a test decides when such runs end)."""

    train_s: float | None = 1.0
    hold: Callable[[str], bool] | None = None


def _client(env: dict[str, str]) -> Any:
    import boto3

    from pipelines.storage import client_config

    return boto3.client(
        "s3",
        endpoint_url=env.get("S3_ENDPOINT_URL") or None,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name="us-east-1",
        config=client_config(),
    )


def train(
    run_id: str,
    arguments: dict[str, Any],
    env: dict[str, str],
    simulation: Simulation,
    cancelled: Callable[[], bool],
) -> str | None:
    """The train task's effects; returns the error it failed with (None: it succeeded)."""
    from pipelines import storage
    from pipelines.result import RunResult
    from pipelines.task_events import TaskEvents, TaskEventsConfig
    from pipelines.tracing import TRACE_KEYS

    job_uuid = arguments["job_uuid"]
    result_uri = arguments.get("result_uri", "")
    request = json.loads(arguments["request_json"])
    client = _client(env)
    config = TaskEventsConfig.from_json(arguments.get("task_events", ""))
    trace = {k: str(arguments.get(k) or "") for k in TRACE_KEYS}  # the run's, as the task's
    events = TaskEvents(config, job_uuid, run_id, trace=trace) if config else None
    try:
        if events:
            events.started()
            events.progress({"step": 1, "total_steps": 1, "epoch": 0, "loss": 1.0})
        dataset = arguments["dataset_uri"]
        if storage.exists(dataset, client) != "file":
            error = f"dataset.uri {dataset!r}: no such object"
            failed = RunResult(job_uuid=job_uuid, status="failed", error=error)
            storage.put_bytes(
                failed.to_json().encode(), storage.join(result_uri, "result.json"), client
            )
            return error
        rows = sum(1 for line in storage.get_bytes(dataset, client).splitlines() if line.strip())
        deadline = time.monotonic() + simulation.train_s
        held = simulation.hold or (lambda _job: False)
        while time.monotonic() < deadline or held(job_uuid):
            if cancelled():
                return "cancelled"
            time.sleep(0.05)
        path = storage.join(result_uri, "checkpoints", f"{request['model']}-sft-0")
        storage.put_bytes(b'{"simulated": true}', storage.join(path, "adapter_config.json"), client)
        checkpoint = {
            "identifier": f"{request['model']}-sft-0",
            "created_at": datetime.now(UTC).isoformat(),
            "epoch": 0,
            "post_training_job_id": job_uuid,
            "path": path,
            "training_metrics": {"epoch": 0, "train_loss": 1.0},
        }
        done = RunResult(
            job_uuid=job_uuid,
            status="completed",
            checkpoints=[checkpoint],
            resources_allocated={"device": "simulated"},
            dataset_rows=rows,
            rows_without_trainable_tokens=0,
        )
        storage.put_bytes(done.to_json().encode(), storage.join(result_uri, "result.json"), client)
        return None
    finally:
        if events:
            events.close()


def notify(run_id: str, arguments: dict[str, Any], state: str, error: str | None) -> None:
    """The exit task: the real notice code."""
    from pipelines.notify import post_run_finished
    from pipelines.tracing import TRACE_KEYS

    post_run_finished(
        arguments.get("notify_url", ""),
        arguments.get("notify_event_type", ""),
        arguments["job_uuid"],
        run_id,
        state,
        error,
        window_s=float(arguments.get("notify_window_s", 300.0)),
        trace={k: str(arguments.get(k) or "") for k in TRACE_KEYS},
    )
