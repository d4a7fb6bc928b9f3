"""pipelines.sa_token against the Kubernetes API stand-in: TokenRequest over HTTPS, as a pod."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.sa_token import (
    EXPIRATION_S,
    POD_NAMESPACE_ENV,
    POD_SERVICE_ACCOUNT_ENV,
    AudienceToken,
    PodIdentity,
    TokenUnavailable,
    request_token,
)
from tests.k8s_standin import KubeApiStandin
from tests.pipelines.pipeline_helpers import RUNNER, pod_env, task_events_config

AUDIENCE = "kfp-trainer-handler"


@pytest.fixture
def api(tmp_path: Path):
    with KubeApiStandin(tmp_path / "api") as server:
        server.grant_token_request(f"system:serviceaccount:{RUNNER[0]}:{RUNNER[1]}", *RUNNER)
        yield server


def test_the_token_is_the_pods_service_account_for_the_audience(api, tmp_path):
    pod = PodIdentity.from_env(pod_env(api, tmp_path / "sa"))
    token = request_token(pod, AUDIENCE)
    account = api.issuer.verify(token, [AUDIENCE])
    assert (account.namespace, account.name) == RUNNER
    assert api.token_requests[-1] == {
        "namespace": RUNNER[0],
        "name": RUNNER[1],
        "spec": {"audiences": [AUDIENCE], "expirationSeconds": EXPIRATION_S},
    }
    with pytest.raises(ValueError, match="invalid for the target audiences"):
        api.issuer.verify(token, ["https://kubernetes.default.svc"])


def test_one_token_serves_until_shortly_before_it_ends(api, tmp_path):
    now = [1000.0]
    holder = AudienceToken(
        AUDIENCE, PodIdentity.from_env(pod_env(api, tmp_path / "sa")), clock=lambda: now[0]
    )
    first = holder.header()
    assert first["Authorization"].startswith("Bearer ")
    now[0] += EXPIRATION_S - 61
    assert holder.header() == first
    assert len(api.token_requests) == 1
    now[0] += 2
    assert holder.header() != first
    assert len(api.token_requests) == 2


def test_a_pod_not_allowed_to_request_tokens_is_told_which_permission(api, tmp_path):
    env = pod_env(api, tmp_path / "sa") | {POD_SERVICE_ACCOUNT_ENV: "someone-else"}
    with pytest.raises(TokenUnavailable) as err:
        request_token(PodIdentity.from_env(env), AUDIENCE)
    assert str(err.value).startswith("TokenRequest for serviceaccount kfp-trainer/someone-else")
    assert "answered 403: the service account needs `create` on `serviceaccounts/token`" in str(
        err.value
    )


def test_the_api_down_is_named(api, tmp_path):
    pod = PodIdentity.from_env(pod_env(api, tmp_path / "sa"))
    api.stop()
    with pytest.raises(TokenUnavailable, match=f"at {pod.api_url} failed: "):
        request_token(pod, AUDIENCE, timeout_s=3)


def test_missing_pod_facts_are_named(tmp_path):
    with pytest.raises(TokenUnavailable) as err:
        PodIdentity.from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert f"{POD_NAMESPACE_ENV}, {POD_SERVICE_ACCOUNT_ENV} not set" in str(err.value)
    env = {
        "KUBERNETES_SERVICE_HOST": "fd00::1",
        POD_NAMESPACE_ENV: "a",
        POD_SERVICE_ACCOUNT_ENV: "b",
    }
    assert PodIdentity.from_env(env).api_url == "https://[fd00::1]:443"
    env["KFP_TRAINER_SA_DIR"] = str(tmp_path / "nothing")
    with pytest.raises(TokenUnavailable, match="cannot read the pod's service-account token"):
        request_token(PodIdentity.from_env(env), AUDIENCE)


# ---------------------------------------------------------------- the tasks' posts


def _authorization(headers: dict[str, str]) -> str:
    return headers.get("authorization", "").removeprefix("Bearer ")


def _notice(url: str, **kwargs: float) -> bool:
    """The exit task's notice for a job that succeeded, with a token for AUDIENCE."""
    from handler import contract
    from pipelines.notify import post_run_finished

    return post_run_finished(
        url,
        contract.RUN_FINISHED,
        "job-t",
        "run-1",
        "SUCCEEDED",
        None,
        token_audience=AUDIENCE,
        **kwargs,
    )


def test_the_exit_tasks_notice_carries_the_pods_token(api, tmp_path, monkeypatch):
    from tests.support.sink import Sink

    for name, value in pod_env(api, tmp_path / "sa").items():
        monkeypatch.setenv(name, value)
    with Sink() as sink:
        assert _notice(sink.url)
    ((headers, _),) = sink.received()
    account = api.issuer.verify(_authorization(headers), [AUDIENCE])
    assert (account.namespace, account.name) == RUNNER


def test_no_token_to_be_had_is_retried_then_given_up(tmp_path, monkeypatch, caplog):
    from tests.support.sink import Sink

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with Sink() as sink:
        assert not _notice(sink.url, window_s=1)
        assert sink.attempts == 0, "nothing is sent without the token the receiver wants"
    (why, *_) = [
        r.error for r in caplog.records if r.getMessage() == "run-finished notice not delivered"
    ]
    assert why.startswith("cannot ask the Kubernetes API for a token: KUBERNETES_SERVICE_HOST")


def test_the_train_tasks_events_carry_one_token(api, tmp_path):
    from pipelines.task_events import TaskEvents
    from tests.support.sink import Sink

    pod = PodIdentity.from_env(pod_env(api, tmp_path / "sa"))
    with Sink() as sink:
        config = task_events_config(sink.url, "te-t", interval_s=0.1)
        events = TaskEvents(config, "te-t", "run-1", token=AudienceToken(AUDIENCE, pod))
        events.started()
        for step in (1, 2, 3):
            events.progress({"step": step, "total_steps": 3, "epoch": 0, "loss": 0.5})
            time.sleep(0.15)
        events.close()
        tokens = {_authorization(headers) for headers, _ in sink.received()}
    assert len(sink.events) >= 2 and len(tokens) == 1
    assert api.issuer.verify(tokens.pop(), [AUDIENCE]).name == RUNNER[1]
    assert len(api.token_requests) == 1


def test_the_pipeline_gives_both_tasks_the_pods_identity_and_the_audience(tmp_path):
    import yaml

    from pipelines.pipeline import compile_pipeline
    from pipelines.settings import PipelineSettings

    path = compile_pipeline(PipelineSettings(token_audience=AUDIENCE), tmp_path / "p.yaml")
    spec, platform = (d for d in yaml.safe_load_all(path.read_text()) if d)
    parameter = spec["root"]["inputDefinitions"]["parameters"]["token_audience"]
    assert parameter["defaultValue"] == AUDIENCE
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-notify", "exec-train"):
        assert executors[executor]["fieldPathAsEnv"] == [
            {"fieldPath": "metadata.namespace", "name": POD_NAMESPACE_ENV},
            {"fieldPath": "spec.serviceAccountName", "name": POD_SERVICE_ACCOUNT_ENV},
        ]
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["notify"]["inputs"]["parameters"]["token_audience"] == {
        "componentInputParameter": "token_audience"
    }
    train = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train"]
    assert train["inputs"]["parameters"]["token_audience"] == {
        "componentInputParameter": "pipelinechannel--token_audience"
    }
