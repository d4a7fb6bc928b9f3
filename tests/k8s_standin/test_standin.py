"""The Kubernetes API stand-in, driven by the official client (``kubernetes``) over HTTPS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from kubernetes import client as k8s

from tests.k8s_standin import API_AUDIENCES, TOKENREVIEWS, KubeApiStandin, TokenIssuer

HANDLER_SA = ("kfp-trainer", "kfp-trainer-handler")
AUDIENCE = "kfp-trainer-handler"


@pytest.fixture
def api(tmp_path: Path):
    with KubeApiStandin(tmp_path / "api") as server:
        server.grant_token_review("system:serviceaccount:kfp-trainer:kfp-trainer-handler")
        yield server


def _client(api: KubeApiStandin, token: str, *, ca: Path | None = None) -> k8s.AuthenticationV1Api:
    config = k8s.Configuration(host=api.url)
    config.api_key = {"authorization": token}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.ssl_ca_cert = str(ca or api.ca_file)
    config.retries = False
    return k8s.AuthenticationV1Api(k8s.ApiClient(config))


def _review(api: KubeApiStandin, token: str, audiences: list[str] | None = None):
    reviewer = api.service_account_token(*HANDLER_SA)
    body = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences))
    return _client(api, reviewer).create_token_review(body).status


def test_a_valid_token_authenticates_as_its_service_account(api):
    token = api.service_account_token("llama-stack", "llama-stack", [AUDIENCE])
    status = _review(api, token, [AUDIENCE, "other"])
    assert status.authenticated is True
    assert status.user.username == "system:serviceaccount:llama-stack:llama-stack"
    assert status.user.uid
    assert status.user.groups == [
        "system:serviceaccounts",
        "system:serviceaccounts:llama-stack",
        "system:authenticated",
    ]
    assert status.audiences == [AUDIENCE]  # the requested ones the token is good for
    assert status.error is None
    assert api.reviews[-1] == {"token": token, "audiences": [AUDIENCE, "other"]}


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda api: api.service_account_token("ns", "sa", [AUDIENCE], expires_in_s=-5),
            "[invalid bearer token, service account token has expired]",
        ),
        (
            lambda api: api.service_account_token("ns", "sa", ["somebody-else"]),
            '[invalid bearer token, token audiences ["somebody-else"] is invalid for the target '
            'audiences ["kfp-trainer-handler"]]',
        ),
        (
            lambda api: api.service_account_token("ns", "sa", [AUDIENCE], not_before_in_s=600),
            "[invalid bearer token, service account token is not valid yet]",
        ),
        (
            lambda api: TokenIssuer(api.issuer.issuer).issue("ns", "sa", [AUDIENCE]),
            "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
        ),
        (
            lambda api: "not-a-jwt",
            "[invalid bearer token, square/go-jose: compact JWS format must have three parts]",
        ),
    ],
    ids=["expired", "wrong-audience", "not-yet-valid", "forged", "malformed"],
)
def test_a_bad_token_is_refused_with_the_authenticators_reason(api, make, error):
    status = _review(api, make(api), [AUDIENCE])
    assert not status.authenticated
    assert status.error == error
    assert status.user.username is None


def test_a_tampered_token_does_not_verify(api):
    header, payload, signature = api.service_account_token("ns", "a", [AUDIENCE]).split(".")
    _, other_payload, _ = api.service_account_token("ns", "admin", [AUDIENCE]).split(".")
    status = _review(api, f"{header}.{other_payload}.{signature}", [AUDIENCE])
    assert not status.authenticated
    assert "cryptographic primitive" in status.error


def test_without_audiences_the_api_servers_own_apply(api):
    token = api.service_account_token("ns", "sa")
    status = _review(api, token)
    assert status.authenticated is True
    assert status.audiences == list(API_AUDIENCES)
    assert not _review(api, token, [AUDIENCE]).authenticated


def test_static_tokens_are_for_the_api_server_only(api):
    api.add_static_token("admin-token", "kube:admin")
    assert _review(api, "admin-token").user.username == "kube:admin"
    status = _review(api, "admin-token", [AUDIENCE])
    assert not status.authenticated and status.error is None  # audience-agnostic: not ours


def test_the_reviewer_must_authenticate_and_be_allowed(api):
    body = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token="x"))
    with pytest.raises(k8s.ApiException) as err:
        _client(api, "nobody").create_token_review(body)
    assert err.value.status == 401
    stranger = api.service_account_token("default", "default")
    with pytest.raises(k8s.ApiException) as err:
        _client(api, stranger).create_token_review(body)
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert 'User "system:serviceaccount:default:default" cannot create resource "tokenreviews"' in (
        message
    )
    for_someone_else = api.service_account_token(*HANDLER_SA, audiences=[AUDIENCE])
    with pytest.raises(k8s.ApiException) as err:
        _client(api, for_someone_else).create_token_review(body)
    assert err.value.status == 401, "a token for another audience is no credential here"


def test_a_body_that_is_no_tokenreview_is_a_400(api):
    reviewer = api.service_account_token(*HANDLER_SA)
    reply = requests.post(
        api.url + TOKENREVIEWS,
        json={"apiVersion": "v1", "kind": "Pod"},
        headers={"Authorization": f"Bearer {reviewer}"},
        verify=str(api.ca_file),
        timeout=5,
    )
    assert reply.status_code == 400
    assert reply.json()["reason"] == "BadRequest"


def test_https_only_with_the_cluster_ca(api, tmp_path):
    other = KubeApiStandin(tmp_path / "other")  # another cluster's CA
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(api.url + "/version", verify=str(other.ca_file), timeout=5)
    assert requests.get(api.url + "/version", verify=str(api.ca_file), timeout=5).status_code == 401


def test_an_outage_refuses_connections_and_ends_on_the_same_port(api):
    token = api.service_account_token("ns", "sa", [AUDIENCE])
    url = api.url
    session = requests.Session()  # a kept-alive connection must not survive the outage
    reviewer = api.service_account_token(*HANDLER_SA)
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}
    review["spec"] = {"token": token, "audiences": [AUDIENCE]}

    def post():
        return session.post(
            url + TOKENREVIEWS,
            json=review,
            headers={"Authorization": f"Bearer {reviewer}"},
            verify=str(api.ca_file),
            timeout=5,
        )

    assert post().status_code == 201
    api.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        post()
    api.start()
    assert api.url == url
    assert post().json()["status"]["authenticated"] is True
