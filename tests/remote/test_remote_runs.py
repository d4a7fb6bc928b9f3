"""How remote mode reads and writes its only record: KFP runs (the stand-in) and S3 (moto).

``outcome.decide`` is checked rule by rule on plain values first; then ``KfpRuns`` against the
stand-in: find-or-create with the request digest, racing replicas converging on one run, outages,
the reconcile window, paging, and the real cause of a failed task.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from handler.backends.base import BackendRejected, BackendUnavailable
from handler.contract import JobStatus
from handler.remote import s3
from handler.remote.outcome import Manifest, Notice, decide, explain
from handler.remote.runs import KfpRuns, request_digest
from handler.settings import HandlerSettings, RemoteSettings, SettingsError
from pipelines.settings import PipelineSettings
from tests.kfp_standin import KfpStandin, Simulation
from tests.remote import fixtures as fx
from tests.remote import standin_pipelines as sp
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.support.jobs import job_request, write_dataset
from tests.support.loopback import wait_for

WHERE = "s3://b/pt/jobs/j/result.json"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def run(state: str, *, failed_task: str | None = None, error: str | None = None):
    """A KFP run as kfp_server_api returns it, with only what decide() reads."""
    tasks = []
    if failed_task:
        tasks.append(
            SimpleNamespace(
                display_name="train", state="FAILED", error=SimpleNamespace(message=failed_task)
            )
        )
    return SimpleNamespace(
        run_id="r1",
        display_name="j",
        state=state,
        created_at=T0,
        finished_at=T0 + timedelta(minutes=5) if state in ("SUCCEEDED", "FAILED") else None,
        state_history=[SimpleNamespace(state="RUNNING", update_time=T0 + timedelta(seconds=3))],
        run_details=SimpleNamespace(task_details=tasks),
        error=SimpleNamespace(message=error) if error else None,
    )


DONE = Manifest({"status": "completed", "checkpoints": [{"identifier": "c"}]}, T0)
BROKEN = Manifest({"status": "failed", "error": "dataset has 0 rows"}, T0)


@pytest.mark.parametrize(
    ("kfp", "manifest", "notice", "status", "words"),
    [
        # 1. a completed manifest wins over anything KFP says
        ("RUNNING", DONE, None, JobStatus.completed, None),
        ("CANCELED", DONE, None, JobStatus.completed, None),
        ("FAILED", DONE, None, JobStatus.completed, None),
        # 2. canceled: cancelled, CANCELING is not an end yet
        ("CANCELED", None, None, JobStatus.cancelled, None),
        ("CANCELING", None, None, JobStatus.in_progress, None),
        # 3. a failed manifest: failed with its error, even while the exit task runs
        ("RUNNING", BROKEN, None, JobStatus.failed, "dataset has 0 rows"),
        # 4./5. KFP's own end
        ("FAILED", None, None, JobStatus.failed, "Inner task failed"),
        ("SKIPPED", None, None, JobStatus.failed, "the run failed"),
        ("SUCCEEDED", None, None, JobStatus.failed, f"no result manifest at {WHERE}"),
        # 6. still RUNNING, but the exit task said how the body ended
        ("RUNNING", None, Notice("FAILED", "Task finetune failed."), JobStatus.failed, "finetune"),
        ("RUNNING", None, Notice("SUCCEEDED"), JobStatus.failed, "no result manifest"),
        ("RUNNING", None, Notice("CANCELED"), JobStatus.cancelled, None),
        # ... or a task already failed while the exit task runs
        (("RUNNING", "Error (exit code 1)"), None, None, JobStatus.failed, "exit code 1"),
        # 7. not ended
        ("PENDING", None, None, JobStatus.scheduled, None),
        ("RUNNING", None, None, JobStatus.in_progress, None),
        ("PAUSED", None, None, JobStatus.in_progress, None),
    ],
)
def test_decide_follows_its_rules_in_order(kfp, manifest, notice, status, words):
    error = "Pipeline finished with status FAILURE. Inner task failed: 'train'."
    kfp, failed_task = kfp if isinstance(kfp, tuple) else (kfp, None)
    state = decide(
        run(kfp, error=error, failed_task=failed_task), manifest, where=WHERE, notice=notice
    )
    assert state.status is status
    if words is None:
        assert state.error is None
    else:
        assert words in state.error
    if status is JobStatus.completed:
        assert state.result["checkpoints"] == [{"identifier": "c"}]
        assert state.completed_at == T0  # when S3 says result.json was written
    assert state.scheduled_at == T0 and state.started_at == T0 + timedelta(seconds=3)


def test_the_failed_tasks_own_error_is_the_cause_and_an_oom_kill_says_what_to_do():
    generic = "Pipeline finished with status FAILURE. Inner task failed: 'train'."
    oom = decide(
        run("FAILED", failed_task="OOMKilled (exit code 137)", error=generic), None, where=WHERE
    )
    assert oom.error.startswith("the train task failed: OOMKilled (exit code 137)")
    assert "KFP_TRAINER_MEMORY_LIMIT" in oom.error and "Inner task failed" not in oom.error
    refused = "S3 refused PUT s3://b/jobs/j/result.json: AccessDenied"
    notice = Notice("FAILED", "Task finetune failed.")
    said = decide(run("RUNNING", failed_task=refused), None, where=WHERE, notice=notice)
    assert said.error == f"the train task failed: {refused}"
    assert "SIGKILL" in explain("train", "Error (exit code 137)")


def test_settings_missing_for_remote_mode_are_named():
    with pytest.raises(SettingsError, match="set KFP_HOST, or KFP_DSPA_NAME"):
        KfpRuns(HandlerSettings(mode="remote"))
    with pytest.raises(SettingsError, match="S3_BUCKET"):
        KfpRuns(HandlerSettings(mode="remote", remote=RemoteSettings(kfp_host="h")))


# ---- against the stand-in -----------------------------------------------------------------------


class Setup:
    def __init__(self, tmp: Path, s3_env: dict[str, str], bucket: str) -> None:
        self.tmp = tmp
        self.bucket = bucket
        self.standin = KfpStandin(token=None, work_dir=tmp / "kfp", simulate=Simulation(0.3))
        self.standin.set_secret(
            fx.S3_SECRET,
            {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY},
        )
        self.standin.set_task_env({"S3_ENDPOINT_URL": s3_env["S3_ENDPOINT_URL"]})
        self.standin.start()
        self.remote = RemoteSettings(
            kfp_host=self.standin.url,
            kfp_experiment="runs",
            s3_endpoint_url=s3_env["S3_ENDPOINT_URL"],
            s3_bucket=bucket,
            s3_prefix=fx.PREFIX,
        )
        self.settings = HandlerSettings(
            mode="remote",
            remote=self.remote,
            sink="",
            pipeline=PipelineSettings(s3_endpoint_url=s3_env["S3_ENDPOINT_URL"]),
        )

    def replica(self, **pipeline: object) -> KfpRuns:
        settings = self.settings
        if pipeline:
            settings = HandlerSettings(
                mode="remote",
                remote=self.remote,
                pipeline=PipelineSettings(s3_endpoint_url=self.remote.s3_endpoint_url, **pipeline),
            )
        return KfpRuns(settings)

    def request(self, job_uuid: str, *, dataset: bool = True) -> dict:
        uri = f"s3://{self.bucket}/{fx.PREFIX}/datasets/{job_uuid}.jsonl"
        if dataset:
            local = write_dataset(self.tmp / f"{job_uuid}.jsonl")
            s3.s3_client(self.remote).upload_file(str(local), self.bucket, uri.split("/", 3)[3])
        data = job_request(job_uuid, uri)
        data["model_artifact"] = {"uri": f"s3://{self.bucket}/{fx.PREFIX}/models/m.tar"}
        return data

    def wait_ended(self, runs: KfpRuns, job_uuid: str, timeout: float = 60):
        def ended():
            found = runs.find(job_uuid)
            state = runs.state(found) if found else None
            return state if state and state.status.terminal else None

        return wait_for(ended, timeout, f"{job_uuid} to end", every=0.2)


@pytest.fixture
def setup(tmp_path, s3_env, bucket):
    world = Setup(tmp_path, s3_env, bucket)
    try:
        yield world
    finally:
        world.standin.close()


def test_create_finds_before_it_creates_and_keeps_the_digest(setup):
    runs = setup.replica()
    request = setup.request("job-c1")
    first, created = runs.create(request, "digest-1")
    assert created
    again, created_again = runs.create(request, "digest-1")
    assert (again.run_id, created_again) == (first.run_id, False)
    assert request_digest(runs.find("job-c1")) == "digest-1"
    assert setup.standin.state.run_count() == 1
    state = setup.wait_ended(runs, "job-c1")
    assert state.status is JobStatus.completed
    assert state.result["checkpoints"][0]["path"].startswith(f"s3://{setup.bucket}/")
    assert state.result["dataset_rows"] == 8


def test_racing_replicas_converge_on_one_run(setup):
    replicas = [setup.replica() for _ in range(6)]
    request = setup.request("job-race")
    chosen: list[str] = []
    barrier = threading.Barrier(len(replicas))

    def create(runs: KfpRuns) -> None:
        barrier.wait()
        chosen.append(runs.create(request, "d")[0].run_id)

    threads = [threading.Thread(target=create, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    survivors = fx.runs_named(setup.standin, "job-race")
    assert len(survivors) == 1, survivors
    assert set(chosen) == {survivors[0]["run_id"]}, "every replica answered with the one run"
    # One that looked before the others' runs existed made its own: the next look deletes it.
    spec = replicas[0].pipeline_spec_json()
    late = replicas[0].kfp.create_run(
        replicas[0]._experiment_id(), "job-race", spec, replicas[0].arguments(request, "d")
    )
    assert replicas[1].find("job-race").run_id == survivors[0]["run_id"]
    assert late.run_id in setup.standin.state.deleted
    assert len(fx.runs_named(setup.standin, "job-race")) == 1


def test_kfp_down_is_unavailable_and_creates_nothing(setup):
    runs = setup.replica()
    setup.standin.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        runs.create(setup.request("job-down"), "d")
    assert time.monotonic() - started < 15
    with pytest.raises(BackendUnavailable):
        runs.find("job-down")
    setup.standin.start()
    assert runs.find("job-down") is None
    assert runs.create(setup.request("job-down"), "d")[1] is True


def test_a_deleted_experiment_is_unavailable_once_then_made_again(setup):
    runs = setup.replica()
    runs.find("warm-up")  # the experiment id is cached now
    with setup.standin.state._lock:  # someone deletes the experiment in the KFP UI
        setup.standin.state._experiments.clear()
    with pytest.raises(BackendUnavailable, match="experiment vanished"):
        runs.create(setup.request("job-exp"), "d")
    run, created = runs.create(setup.request("job-exp"), "d")
    assert created and run.display_name == "job-exp"


def test_local_artifacts_are_refused_naming_the_field(setup):
    request = setup.request("job-local")
    request["dataset"] = {"uri": "/home/me/train.jsonl"}
    with pytest.raises(BackendRejected, match=r"dataset.uri '/home/me/train.jsonl' is not an s3"):
        setup.replica().create(request, "d")
    assert setup.standin.state.run_count() == 0


def test_kubernetes_settings_reach_the_submitted_platform_spec(setup):
    runs = setup.replica(
        node_selector={"node.kubernetes.io/instance-type": "g5.xlarge"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        image_pull_secrets=("quay-pull",),
        model_cache_pvc="model-cache",
        accelerator_count=1,
        s3_secret_name="team-s3",
    )
    run, _ = runs.create(setup.request("job-k8s"), "d")
    platform = setup.standin.state.platform_spec(run.run_id)["platforms"]["kubernetes"]
    train = platform["deploymentSpec"]["executors"]["exec-train"]
    assert train["nodeSelector"]["labels"] == {"node.kubernetes.io/instance-type": "g5.xlarge"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert [s["secretName"] for s in train["secretAsEnv"]] == ["team-s3"]
    assert train["pvcMount"][0]["mountPath"]
    assert "quay-pull" in json.dumps(train["imagePullSecret"])
    spec = setup.standin.state.get_run(run.run_id)["pipeline_spec"]["pipeline_spec"]
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "1"


def test_ended_since_lists_this_deployments_runs_that_ended_in_the_window(setup, tmp_path):
    runs = setup.replica()
    for name in ("job-e1", "job-e2"):
        runs.create(setup.request(name), "d")
    for name in ("job-e1", "job-e2"):
        setup.wait_ended(runs, name)
    wait_for(lambda: setup.standin.state.wait_idle(0.1), 30, "runs to settle")
    foreign = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    runs.kfp.create_run(
        runs._experiment_id(),
        "someone-elses",
        json.dumps(yaml.safe_load(foreign.read_text())).encode(),
        {"final_out": str(tmp_path / "f")},
    )
    cutoff = datetime.now(UTC) - timedelta(minutes=5)
    assert sorted(r.display_name for r in runs.ended_since(cutoff)) == ["job-e1", "job-e2"]
    assert runs.ended_since(datetime.now(UTC) + timedelta(seconds=1)) == []


def test_pages_walk_every_run_newest_first(setup):
    runs = setup.replica()
    names = [f"job-p{i}" for i in range(5)]
    for name in names:
        runs.create(setup.request(name, dataset=False), "d")
    seen, token = [], ""
    while True:
        page, token = runs.page(token, 2)
        seen += [r.display_name for r in page]
        if not token:
            break
    assert seen == names[::-1]


def test_progress_comes_from_s3_while_the_run_runs(setup):
    runs = setup.replica()
    setup.standin.state.simulation = Simulation(train_s=5.0)
    run, _ = runs.create(setup.request("job-prog"), "d")
    events_off = runs.arguments(setup.request("job-prog"), "d")["task_events"]
    assert events_off == "", "no Broker URL: no task events asked for"
    key = s3.job_prefix(setup.remote, "job-prog") + s3.PROGRESS_FILE
    s3.s3_client(setup.remote).put_object(
        Bucket=setup.bucket, Key=key, Body=json.dumps({"step": 3, "total_steps": 8}).encode()
    )
    state = wait_for(
        lambda: (s := runs.state(runs.find("job-prog"))).status is JobStatus.in_progress and s,
        30,
        "the run to be RUNNING",
    )
    assert state.progress == {"step": 3, "total_steps": 8}
    runs.terminate(run)


def test_a_manifest_that_is_not_json_fails_the_job_naming_it(setup):
    runs = setup.replica()
    setup.standin.state.simulation = Simulation(train_s=30.0)
    run, _ = runs.create(setup.request("job-bad-manifest"), "d")
    key = s3.job_prefix(setup.remote, "job-bad-manifest") + s3.RESULT_FILE
    s3.s3_client(setup.remote).put_object(Bucket=setup.bucket, Key=key, Body=b"{not json")
    state = runs.state(run, Notice("SUCCEEDED"))
    assert state.status is JobStatus.failed
    assert "result.json is not valid JSON" in state.error
    runs.terminate(run)


def test_s3_down_is_unavailable_never_a_guess(setup):
    runs = setup.replica()
    run, _ = runs.create(setup.request("job-s3"), "d")
    from tests.support.s3 import FaultyS3

    with FaultyS3(503, "SlowDown") as faulty:
        cut_off = setup.replica()
        cut_off._s3 = s3.s3_client(
            RemoteSettings(**{**setup.remote.__dict__, "s3_endpoint_url": faulty.url})
        )
        with pytest.raises(BackendUnavailable, match="S3 unavailable"):
            cut_off.state(run, Notice("FAILED", "Task finetune failed."))
    runs.terminate(run)
