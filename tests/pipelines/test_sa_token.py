"""pipelines.sa_token against the Kubernetes API stand-in: TokenRequest over HTTPS, as a pod."""

from __future__ import annotations

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

RUNNER = ("kfp-trainer", "pipeline-runner-dspa")
AUDIENCE = "kfp-trainer-handler"


def pod_env(api: KubeApiStandin, sa_dir: Path) -> dict[str, str]:
    """What a pipeline pod has: the API address, its service-account files, the downward API."""
    sa_dir.mkdir(parents=True, exist_ok=True)
    (sa_dir / "token").write_text(api.service_account_token(*RUNNER))
    (sa_dir / "ca.crt").write_bytes(api.ca_file.read_bytes())
    host, port = api.url.removeprefix("https://").split(":")
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KFP_TRAINER_SA_DIR": str(sa_dir),
        POD_NAMESPACE_ENV: RUNNER[0],
        POD_SERVICE_ACCOUNT_ENV: RUNNER[1],
    }


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
