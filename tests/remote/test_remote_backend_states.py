"""RemoteBackend's status, cancel and readiness: KFP states from the stand-in, manifests in S3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import kfp_server_api
import pytest
import yaml

from handler.contract import JobStatus
from handler.remote import s3
from handler.remote.backend import RemoteBackend, job_status
from handler.settings import HandlerSettings, RemoteSettings
from tests.kfp_standin import KfpStandin
from tests.remote import standin_pipelines as sp

# The issue's table, spelled out: every V2beta1 state and the job status it means.
EXPECTED = {
    "PENDING": JobStatus.scheduled,
    "RUNNING": JobStatus.in_progress,
    "PAUSED": JobStatus.in_progress,
    "SUCCEEDED": JobStatus.completed,
    "FAILED": JobStatus.failed,
    "SKIPPED": JobStatus.failed,
    "CANCELING": JobStatus.cancelled,
    "CANCELED": JobStatus.cancelled,
    "RUNTIME_STATE_UNSPECIFIED": JobStatus.scheduled,
}


def test_every_kfp_state_has_its_job_status():
    assert set(EXPECTED) == set(kfp_server_api.V2beta1RuntimeState.allowable_values)
    for state, status in EXPECTED.items():
        assert job_status(state) is status, state
    assert job_status(None) is JobStatus.scheduled


def test_constructor_names_missing_settings():
    with pytest.raises(ValueError, match="set KFP_HOST, or KFP_DSPA_NAME"):
        RemoteBackend(HandlerSettings(mode="remote"), None)
    with pytest.raises(ValueError, match="S3_BUCKET"):
        RemoteBackend(HandlerSettings(mode="remote", remote=RemoteSettings(kfp_host="h")), None)


@pytest.fixture
def standin(tmp_path: Path):
    with KfpStandin(token="tok", work_dir=tmp_path / "standin") as server:
        yield server


@pytest.fixture
def backend(standin, s3_env, bucket) -> RemoteBackend:
    remote = RemoteSettings(
        kfp_host=standin.url,
        kfp_token="tok",
        kfp_experiment="states",
        s3_endpoint_url=s3_env["S3_ENDPOINT_URL"],
        s3_bucket=bucket,
        notify_url="http://127.0.0.1:9/unused",
    )
    return RemoteBackend(HandlerSettings(mode="remote", remote=remote), None)


def start_run(backend: RemoteBackend, tmp_path: Path, job_uuid: str, **arguments) -> str:
    package = sp.compile_to(sp.exit_pipeline, tmp_path / f"{job_uuid}.yaml")
    spec = yaml.safe_load(package.read_text())
    params = {"final_out": str(tmp_path / f"{job_uuid}.final"), **arguments}
    run = backend.kfp.create_run(backend._experiment_id(), job_uuid, spec, params)
    return run.run_id


def put_manifest(backend: RemoteBackend, job_uuid: str, manifest: dict) -> None:
    key = s3.job_prefix(backend.remote, job_uuid) + s3.RESULT_FILE
    backend._s3_client().put_object(
        Bucket=backend.remote.s3_bucket, Key=key, Body=json.dumps(manifest).encode()
    )


def wait_status(backend, job_uuid, run_id, wanted, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = backend.status(job_uuid, run_id)
        if state.status in wanted:
            return state
        time.sleep(0.3)
    raise AssertionError(f"{job_uuid} never reached {wanted}")


MANIFEST = {
    "job_uuid": "job-a",
    "status": "completed",
    "error": None,
    "checkpoints": [
        {
            "identifier": "job-a-epoch-0",
            "created_at": "2026-01-01T00:00:00Z",
            "epoch": 0,
            "post_training_job_id": "job-a",
            "path": "s3://b/jobs/job-a/checkpoints/epoch_0",
        }
    ],
    "dataset_rows": 8,
}


def test_manifest_ends_a_job_whose_run_still_shows_running(backend, tmp_path):
    run_id = start_run(backend, tmp_path, "job-a", seconds=60.0)
    state = wait_status(backend, "job-a", None, {JobStatus.in_progress})
    assert state.run_id == run_id and state.started_at is not None
    put_manifest(backend, "job-a", MANIFEST)  # the train task is done; the exit task runs
    state = backend.status("job-a", run_id)
    assert state.status is JobStatus.completed
    assert state.result["checkpoints"][0]["identifier"] == "job-a-epoch-0"
    assert state.error is None
    backend.cancel("job-a", run_id)


def test_cancel_terminates_and_reads_cancelled(backend, standin, tmp_path):
    run_id = start_run(backend, tmp_path, "job-c", seconds=60.0)
    wait_status(backend, "job-c", run_id, {JobStatus.in_progress})
    backend.cancel("job-c", None)  # found by display name
    state = wait_status(backend, "job-c", run_id, {JobStatus.cancelled}, timeout=30)
    assert standin.state.get_run(run_id)["state"] in ("CANCELING", "CANCELED")
    wait_status(backend, "job-c", run_id, {JobStatus.cancelled})
    assert standin.state.wait_idle(30)
    assert standin.state.get_run(run_id)["state"] == "CANCELED"
    assert backend.status("job-c", run_id).completed_at is not None
    backend.cancel("job-c", run_id)  # again: a no-op on an ended run
    assert state.status is JobStatus.cancelled


def test_succeeded_without_manifest_is_a_failure_naming_the_uri(backend, tmp_path):
    run_id = start_run(backend, tmp_path, "job-s")
    state = wait_status(backend, "job-s", run_id, {JobStatus.failed, JobStatus.completed})
    assert state.status is JobStatus.failed
    assert "wrote no result manifest at s3://" in state.error
    assert "/jobs/job-s/result.json" in state.error


def test_failed_run_reports_the_manifest_error_or_kfp_error(backend, tmp_path):
    run_id = start_run(backend, tmp_path, "job-f", fail=True)
    state = wait_status(backend, "job-f", run_id, {JobStatus.failed})
    assert "sleep-then-fail" in state.error  # KFP's run error names the failed task
    put_manifest(backend, "job-f", {"status": "failed", "error": "dataset has 0 rows"})
    assert backend.status("job-f", run_id).error == "dataset has 0 rows"


def test_unknown_job_is_scheduled_and_deleted_run_is_failed(backend):
    assert backend.status("never-submitted", None).status is JobStatus.scheduled
    gone = backend.status("job-x", "no-such-run")
    assert gone.status is JobStatus.failed and "no longer exists" in gone.error
    backend.cancel("never-submitted", None)  # nothing to cancel: no error


def start_job_run(backend: RemoteBackend, tmp_path: Path, name: str, **arguments) -> str:
    """A run named ``name`` of a pipeline with a job_uuid parameter (``name`` unless given)."""
    package = tmp_path / "job.yaml"
    if not package.exists():
        sp.compile_to(sp.job_pipeline, package)
    spec = yaml.safe_load(package.read_text())
    params = {"job_uuid": name, **arguments}
    return backend.kfp.create_run(backend._experiment_id(), name, spec, params).run_id


def test_list_active_names_this_deployments_unfinished_runs(backend, standin, tmp_path):
    mine = {
        f"job-l{i}": start_job_run(backend, tmp_path, f"job-l{i}", seconds=60.0) for i in (1, 2)
    }
    others = [
        start_run(backend, tmp_path, "job-foreign", seconds=60.0),  # no job_uuid parameter
        start_job_run(backend, tmp_path, "job-renamed", job_uuid="job-x", seconds=60.0),
    ]
    done = start_job_run(backend, tmp_path, "job-done")
    deadline = time.monotonic() + 120
    while standin.state.get_run(done)["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline, standin.state.get_run(done)
        time.sleep(0.3)
    try:
        assert sorted(backend.list_active()) == ["job-l1", "job-l2"]
        # Paged the way the server pages: one run per page still finds them all.
        listed = backend.kfp.runs_in_states(
            backend._experiment_id(), ("PENDING", "RUNNING"), page_size=1
        )
        assert sorted(r.run_id for r in listed) == sorted([*mine.values(), *others])
    finally:
        for run_id in [*mine.values(), *others]:
            backend.kfp.terminate_run(run_id)
    deadline = time.monotonic() + 60
    while backend.list_active():  # CANCELING and CANCELED runs have ended
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_ready_follows_kfp_reachability(backend, standin):
    assert backend.ready() is True
    standin.stop()
    started = time.monotonic()
    assert backend.ready() is False
    assert time.monotonic() - started < 10
    standin.start()
    assert backend.ready() is True
