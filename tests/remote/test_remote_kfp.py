"""handler.remote.kfp against the stand-in: auth sources, 401 rebuild, outages, DSPA, HTTPS."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from handler.backends.base import BackendUnavailable
from handler.remote.auth import TokenError, read_token
from handler.remote.discovery import DiscoveryError, discover_host
from handler.remote.kfp import KfpAuthError, KfpClient, KfpNotFound
from handler.settings import RemoteSettings
from tests.k8s_standin import KubeApiStandin
from tests.kfp_standin import KfpStandin
from tests.support.tls import make_tls


@pytest.fixture
def standin(tmp_path: Path):
    with KfpStandin(token="first-token", work_dir=tmp_path / "standin") as server:
        yield server


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch, tmp_path):
    """No in-cluster config and an empty kubeconfig unless a test points KUBECONFIG somewhere."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def statuses(standin: KfpStandin) -> list[int]:
    return [status for _, _, status in standin.requests]


def test_static_token_experiment_created_once_and_cached(standin):
    client = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="first-token"))
    assert client.healthz()["multi_user"] is False
    exp = client.experiment_id("llama-stack-post-training")
    assert client.experiment_id("llama-stack-post-training") == exp
    other = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="first-token"))
    assert other.experiment_id("llama-stack-post-training") == exp  # found, not re-created
    created = [p for m, p, s in standin.requests if m == "POST" and p.endswith("/experiments")]
    assert len(created) == 1
    assert client.runs_named(exp, "job-x") == []


def test_multi_user_server_gets_the_namespace(standin):
    standin.state.multi_user = True
    client = KfpClient(
        RemoteSettings(kfp_host=standin.url, kfp_token="first-token", kfp_namespace="team-b")
    )
    exp = client.experiment_id("shared-name")
    assert standin.state.get_experiment(exp)["namespace"] == "team-b"
    assert client.runs_named(exp, "job-1") == []


def test_401_rebuilds_with_fresh_service_account_token(standin, tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    client = KfpClient(RemoteSettings(kfp_host=standin.url, sa_token_path=str(token_file)))
    client.healthz()
    standin.set_token("second-token")  # the kubelet rotated the projected token
    token_file.write_text("second-token\n")
    caplog.set_level(logging.INFO, logger="handler")
    exp = client.experiment_id("e")
    assert exp
    # healthz ok; (rotation) healthz 401, rebuilt, healthz ok; list and create experiment ok
    assert statuses(standin) == [200, 401, 200, 200, 200]
    assert "rebuilding the client" in caplog.text
    assert "second-token" not in caplog.text and "first-token" not in caplog.text


def test_401_with_a_token_that_stays_wrong_is_a_clear_error(standin, caplog):
    client = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="not-the-token"))
    caplog.set_level(logging.DEBUG, logger="handler")
    with pytest.raises(KfpAuthError) as err:
        client.healthz()
    message = str(err.value)
    assert "rejected the token from KFP_TOKEN (HTTP 401)" in message
    assert standin.url in message
    assert "not-the-token" not in message and "not-the-token" not in caplog.text
    assert isinstance(err.value, BackendUnavailable)  # answered 503: nothing lost
    assert statuses(standin) == [401, 401]  # one rebuild and one retry, no more


def test_recovers_once_the_token_source_is_fixed(standin, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("stale")
    client = KfpClient(RemoteSettings(kfp_host=standin.url, sa_token_path=str(token_file)))
    with pytest.raises(KfpAuthError, match="service-account token file"):
        client.healthz()
    token_file.write_text("first-token")
    assert client.healthz()["multi_user"] is False


def test_unreachable_is_backend_unavailable_quickly_then_recovers(standin):
    client = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="first-token"))
    exp = client.experiment_id("e")
    standin.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="is unreachable") as err:
        client.runs_named(exp, "job-1")
    assert time.monotonic() - started < 10
    assert standin.url in str(err.value)
    standin.start()
    assert client.runs_named(exp, "job-1") == []


def test_not_found_run(standin):
    client = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="first-token"))
    with pytest.raises(KfpNotFound, match="Run nope not found"):
        client.get_run("nope")


def _kube_api(tmp_path: Path, token: str, **kwargs: str) -> KubeApiStandin:
    """The Kubernetes API over plain HTTP (kubeconfig tests), accepting ``token`` (`oc login`)."""
    api = KubeApiStandin(tmp_path / "kube-api", tls=False, **kwargs).start()
    api.add_static_token(token, "kube:admin")
    return api


def test_token_sources_in_order(tmp_path, monkeypatch):
    api = _kube_api(tmp_path, "kube-token")
    try:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig", "kube-token")))
        token_file = tmp_path / "sa"
        token_file.write_text("sa-token\n")
        assert read_token(RemoteSettings(kfp_token="static")).value == "static"
        from_file = read_token(RemoteSettings(sa_token_path=str(token_file)))
        assert (from_file.value, "sa-token" in repr(from_file)) == ("sa-token", False)
        assert read_token(RemoteSettings()).source == "kubeconfig"
        assert read_token(RemoteSettings()).value == "kube-token"
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
        assert read_token(RemoteSettings()).source == "none"
        token_file.write_text("")
        with pytest.raises(TokenError, match="is empty"):
            read_token(RemoteSettings(sa_token_path=str(token_file)))
        with pytest.raises(TokenError, match="KF_PIPELINES_SA_TOKEN_PATH"):
            read_token(RemoteSettings(sa_token_path=str(tmp_path / "absent")))
    finally:
        api.close()


def test_host_discovered_from_dspa_with_kubeconfig_token(standin, tmp_path, monkeypatch):
    api = _kube_api(tmp_path, "first-token")  # `oc login`: one token for cluster and route
    try:
        monkeypatch.setenv(
            "KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig", "first-token"))
        )
        api.add_dspa("team-a", "dspa", standin.url)
        assert discover_host("team-a", "dspa") == standin.url
        client = KfpClient(RemoteSettings(dspa_name="dspa", kfp_namespace="team-a"))
        assert client.host == standin.url
        assert client.healthz()["multi_user"] is False
        assert api.seen_auth[-1] == "Bearer first-token"
        with pytest.raises(DiscoveryError, match="'other' in namespace 'team-a' not found"):
            discover_host("team-a", "other")
        api.add_dspa("team-a", "starting", None)
        with pytest.raises(DiscoveryError, match="no status.components.apiServer.externalUrl"):
            discover_host("team-a", "starting")
    finally:
        api.close()


def test_dspa_v1alpha1_is_found_too(tmp_path, monkeypatch):
    api = _kube_api(tmp_path, "k", dspa_version="v1alpha1")
    try:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig", "k")))
        api.add_dspa("ns", "old", "https://ds-pipeline-old.apps.example")
        assert discover_host("ns", "old") == "https://ds-pipeline-old.apps.example"
    finally:
        api.close()


def test_no_kubernetes_credentials_says_set_kfp_host():
    with pytest.raises(DiscoveryError, match="set KFP_HOST"):
        discover_host("ns", "dspa")


# -- HTTPS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_standin(tmp_path: Path):
    tls = make_tls(tmp_path / "tls", "kfp-standin")
    with KfpStandin(
        token="tls-token", work_dir=tmp_path / "standin", tls=(tls.cert, tls.key)
    ) as server:
        assert server.url.startswith("https://")
        yield server, tls.ca


def test_https_with_an_untrusted_certificate_says_what_to_set(tls_standin):
    standin, _ = tls_standin
    client = KfpClient(RemoteSettings(kfp_host=standin.url, kfp_token="tls-token"))
    with pytest.raises(BackendUnavailable) as err:
        client.experiment_id("e")
    message = str(err.value)
    assert message.startswith(f"KFP at {standin.url} presented a TLS certificate")
    assert "certificate verify failed" in message
    assert "set KFP_CA_BUNDLE to the CA that signed it" in message
    assert standin.requests == []  # nothing was sent over the unverified connection


def test_https_trusting_the_ca_bundle_works(tls_standin):
    standin, cert = tls_standin
    remote = RemoteSettings(kfp_host=standin.url, kfp_token="tls-token", kfp_ca_bundle=str(cert))
    client = KfpClient(remote)
    exp = client.experiment_id("e")
    assert client.runs_named(exp, "job-1") == []
    assert statuses(standin) and set(statuses(standin)) == {200}


def test_https_without_verification_works_and_says_so(tls_standin, caplog):
    standin, _ = tls_standin
    remote = RemoteSettings(kfp_host=standin.url, kfp_token="tls-token", kfp_verify_ssl=False)
    from urllib3.exceptions import InsecureRequestWarning

    with caplog.at_level(logging.WARNING, logger="handler"), pytest.warns(InsecureRequestWarning):
        assert KfpClient(remote).healthz()["multi_user"] is False
    assert "kfp TLS certificate is not verified (KFP_VERIFY_SSL=false)" in caplog.text


def test_a_missing_ca_bundle_is_named(tls_standin, tmp_path):
    standin, _ = tls_standin
    missing = tmp_path / "nowhere" / "ca.crt"
    remote = RemoteSettings(kfp_host=standin.url, kfp_token="t", kfp_ca_bundle=str(missing))
    with pytest.raises(BackendUnavailable, match=f"KFP_CA_BUNDLE='{missing}' is not a readable"):
        KfpClient(remote).healthz()


def test_kfp_tls_settings_come_from_the_environment():
    remote = RemoteSettings.from_env({"KFP_VERIFY_SSL": "false", "KFP_CA_BUNDLE": "/ca.pem"})
    assert (remote.kfp_verify_ssl, remote.kfp_ca_bundle) == (False, "/ca.pem")
