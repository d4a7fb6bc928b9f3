"""RemoteBackend.submit with the real pipeline: the stand-in trains the tiny model from S3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from handler import contract
from handler.backends.base import BackendRejected, BackendUnavailable
from handler.contract import JobStatus
from handler.remote import s3
from handler.remote.backend import RemoteBackend
from handler.settings import HandlerSettings, RemoteSettings
from pipelines.settings import PipelineSettings
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.support.jobs import make_tiny_model
from tests.support.loopback import wait_for
from tests.support.sink import Sink

TOKEN = "submit-token-0001"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "llama3.2-tiny")


@pytest.fixture
def sink():
    with Sink() as server:
        yield server


@pytest.fixture
def setup(tmp_path, s3_env, bucket, tiny_model, sink):
    remote = RemoteSettings(
        kfp_host="",
        kfp_token=TOKEN,
        kfp_experiment="submit",
        s3_endpoint_url=s3_env["S3_ENDPOINT_URL"],
        s3_bucket=bucket,
        s3_prefix=fx.PREFIX,
        notify_url=sink.url,
    )
    model_uri = fx.upload_tiny_model(tiny_model, remote)
    with fx.standin_with_secrets(tmp_path / "standin", TOKEN) as standin:
        remote = RemoteSettings(**{**remote.__dict__, "kfp_host": standin.url})
        pipeline = PipelineSettings(
            s3_endpoint_url=s3_env["S3_ENDPOINT_URL"], cache_dir=tmp_path / "cache"
        )
        settings = HandlerSettings(mode="remote", remote=remote, pipeline=pipeline)
        yield RemoteBackend(settings, None), standin, remote, model_uri


def test_submit_trains_from_s3_writes_manifest_and_notifies(setup, sink, tmp_path):
    backend, standin, remote, model_uri = setup
    request = fx.remote_request(remote, "job-remote-1", tmp_path, model_uri)
    run_id = backend.submit(request)
    assert backend.submit(request) == run_id  # redelivered: found by display name
    assert standin.state.run_count() == 1

    def ended():
        state = backend.status("job-remote-1", run_id)
        return state if state.status.terminal else None

    state = wait_for(ended, 600, "the remote run to end", every=1.0)
    log = standin.state.run_log(run_id)
    assert state.status is JobStatus.completed, (state.error, log[-4000:])
    checkpoints = state.result["checkpoints"]
    assert checkpoints and all(c["path"].startswith("s3://") for c in checkpoints)
    keys = fx.list_keys(remote, s3.job_prefix(remote, "job-remote-1"))
    assert s3.job_prefix(remote, "job-remote-1") + "result.json" in keys
    for checkpoint in checkpoints:
        _, key = checkpoint["path"].removeprefix("s3://").split("/", 1)
        assert any(k.startswith(key.rstrip("/") + "/") for k in keys), checkpoint["path"]
    assert state.result["dataset_rows"] == 8

    # The exit handler's notice, exactly as the handler's ingress expects it.
    notice = wait_for(lambda: sink.of("job-remote-1"), 120, "the run.finished notice")[0]
    assert notice["type"] == contract.RUN_FINISHED
    assert notice["id"] == "job-remote-1/run.finished"
    assert notice["data"]["job_uuid"] == "job-remote-1"
    assert notice["data"]["run_id"] == run_id  # {{$.pipeline_job_uuid}} is the KFP run id
    assert notice["data"]["state"] in ("SUCCEEDED", "COMPLETE", "SUCCESS")

    # Secrets reached the task only through the Secret: never in the IR, parameters or logs.
    assert standin.state.wait_idle(120)
    run = standin.state.get_run(run_id)
    submitted = json.dumps({"spec": run["pipeline_spec"], "config": run["runtime_config"]})
    for secret in (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, TOKEN):
        assert secret not in submitted
        assert secret not in standin.state.run_log(run_id)
        assert secret not in json.dumps(sink.events)
    platform = standin.state.platform_spec(run_id)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secret_refs = [e["secretName"] for x in executors.values() for e in x.get("secretAsEnv", [])]
    assert secret_refs == [fx.S3_SECRET]


def test_submit_rejects_local_artifacts_naming_the_field(setup):
    backend, standin, remote, model_uri = setup
    request = {
        "job_uuid": "job-local",
        "model": "llama3.2-tiny",
        "training_config": {"n_epochs": 1},
        "algorithm_config": {},
        "dataset": {"uri": "/home/me/train.jsonl"},
        "model_artifact": {"uri": model_uri},
    }
    with pytest.raises(BackendRejected, match=r"dataset.uri '/home/me/train.jsonl' is not an s3"):
        backend.submit(request)
    assert standin.state.run_count() == 0


def test_submit_while_kfp_is_down_is_unavailable_then_works(setup, tmp_path):
    backend, standin, remote, model_uri = setup
    request = fx.remote_request(remote, "job-down", tmp_path, model_uri)
    standin.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        backend.submit(request)
    assert time.monotonic() - started < 15
    standin.start()
    run_id = backend.submit(request)
    assert standin.state.get_run(run_id)["display_name"] == "job-down"
    backend.cancel("job-down", run_id)
    assert standin.state.wait_idle(60)


def test_racing_replicas_converge_on_the_oldest_run(setup, tmp_path):
    backend, standin, remote, model_uri = setup
    replica = RemoteBackend(backend.settings, None)  # another handler pod, same KFP
    request = fx.remote_request(remote, "job-race", tmp_path, model_uri)
    first = backend.submit(request)
    # The other replica looked before the first run existed and created its own.
    experiment = replica._experiment_id()
    second = replica.kfp.create_run(
        experiment, "job-race", replica.pipeline_spec(), replica.arguments(request)
    ).run_id
    assert replica._converge(experiment, "job-race", second) == first
    wait_for(
        lambda: standin.state.get_run(second)["state"] in ("CANCELING", "CANCELED"),
        30,
        "the younger duplicate to be terminated",
    )
    assert standin.state.get_run(first)["state"] not in ("CANCELING", "CANCELED")
    assert replica.submit(request) == first == backend.submit(request)
    assert replica.status("job-race", None).run_id == first
    backend.cancel("job-race", first)
    assert standin.state.wait_idle(60)


def test_deleted_experiment_is_retried_then_recreated(setup, tmp_path):
    backend, standin, remote, model_uri = setup
    request = fx.remote_request(remote, "job-exp", tmp_path, model_uri)
    backend.kfp.experiment_id(remote.kfp_experiment)  # cached
    with standin.state._lock:  # someone deletes the experiment in the KFP UI
        standin.state._experiments.clear()
    with pytest.raises(BackendUnavailable, match="experiment vanished"):
        backend.submit(request)
    run_id = backend.submit(request)  # the dispatcher's retry: experiment created again
    assert standin.state.get_run(run_id)["display_name"] == "job-exp"
    backend.cancel("job-exp", run_id)
    assert standin.state.wait_idle(60)


def test_kubernetes_settings_reach_the_submitted_platform_spec(setup, tmp_path):
    backend, standin, remote, model_uri = setup
    pipeline = PipelineSettings(
        s3_endpoint_url=remote.s3_endpoint_url,
        node_selector={"node.kubernetes.io/instance-type": "g5.xlarge"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        image_pull_secrets=("quay-pull",),
        model_cache_pvc="model-cache",
        accelerator_count=1,
        s3_secret_name="team-s3",
    )
    settings = HandlerSettings(mode="remote", remote=remote, pipeline=pipeline)
    gpu_backend = RemoteBackend(settings, None)
    request = fx.remote_request(remote, "job-k8s", tmp_path, model_uri)
    run_id = gpu_backend.submit(request)
    gpu_backend.cancel("job-k8s", run_id)  # the stand-in has no GPU node; only the spec matters
    platform = standin.state.platform_spec(run_id)["platforms"]["kubernetes"]
    train = platform["deploymentSpec"]["executors"]["exec-train"]
    assert train["nodeSelector"]["labels"] == {"node.kubernetes.io/instance-type": "g5.xlarge"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert [s["secretName"] for s in train["secretAsEnv"]] == ["team-s3"]
    assert train["pvcMount"][0]["mountPath"]
    assert "quay-pull" in json.dumps(train["imagePullSecret"])
    spec = standin.state.get_run(run_id)["pipeline_spec"]["pipeline_spec"]
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "1"
    assert standin.state.wait_idle(60)
