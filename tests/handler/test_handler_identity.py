"""Caller identity (handler/identity.py): gunicorn on 127.0.0.1, real curl, and the Kubernetes
API stand-in answering TokenReviews over HTTPS.

Two handlers run side by side on the same fake pipeline: one with ``KFP_TRAINER_AUTH=true``
and one as it was before identity checks, so "the right caller gets the same answers" is a
comparison, not a list of expectations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handler import contract
from handler.identity import EXTENSION, Caller, Policy, bearer_token, event_type
from handler.settings import AuthSettings, HandlerSettings, SettingsError
from tests.handler.conftest import FAKE_BACKEND
from tests.handler.helpers import request_data
from tests.k8s_standin import KubeApiStandin, TokenIssuer
from tests.support.gunicorn import Gunicorn
from tests.support.http_client import ce_headers, curl, header_args
from tests.support.jobs import write_dataset
from tests.support.loopback import wait_for
from tests.support.sink import Sink

AUDIENCE = "kfp-trainer-handler"
NS = "kfp-trainer"
HANDLER_SA = (NS, "kfp-trainer-handler")
HANDLER_USER = f"system:serviceaccount:{NS}:kfp-trainer-handler"
# (namespace, name) of each caller the handler under test lists, and one it does not.
REQUESTER = (NS, "kfp-trainer-job-requested-oidc-eventing.knative.dev-trigger")
NOTIFIER = (NS, "pipeline-runner-dspa")
RECONCILER = (NS, "kfp-trainer-reconcile-oidc-sources.knative.dev-pingsource")
READER = ("llama-stack", "llama-stack")
STRANGER = (NS, "default")
RETRY_AFTER_S = "7"


def user(sa: tuple[str, str]) -> str:
    return f"system:serviceaccount:{sa[0]}:{sa[1]}"


def auth_env(api: KubeApiStandin, token_file: Path) -> dict[str, str]:
    return {
        "KFP_TRAINER_AUTH": "true",
        "KFP_TRAINER_AUTH_AUDIENCE": AUDIENCE,
        "KFP_TRAINER_AUTH_API_URL": api.url,
        "KFP_TRAINER_AUTH_TOKEN_PATH": str(token_file),
        "KFP_TRAINER_AUTH_CA_PATH": str(api.ca_file),
        "KFP_TRAINER_AUTH_CACHE_S": "30",
        "KFP_TRAINER_AUTH_TIMEOUT_S": "3",
        "KFP_TRAINER_AUTH_REQUESTERS": user(REQUESTER),
        "KFP_TRAINER_AUTH_NOTIFIERS": user(NOTIFIER),
        "KFP_TRAINER_AUTH_RECONCILERS": user(RECONCILER),
        "KFP_TRAINER_AUTH_READERS": user(READER),
    }


class World:
    """The API stand-in, a handler with identity checks, one without, the sink and a dataset."""

    def __init__(self, base: Path, model_store: Path, sink: Sink) -> None:
        self.base = base
        self.sink = sink
        self.api = KubeApiStandin(base / "api").start()
        self.api.grant_token_review(HANDLER_USER)
        self.token_file = base / "handler-token"
        self.token_file.write_text(self.api.service_account_token(*HANDLER_SA) + "\n")
        self.dataset = write_dataset(base / "data" / "train.jsonl")
        self.common = common = {
            "KFP_TRAINER_MODEL_STORE": str(model_store),
            "KFP_TRAINER_DATA_ROOTS": str(base / "data"),
            "KFP_TRAINER_BACKEND": FAKE_BACKEND,
            "KFP_TRAINER_PROGRESS_INTERVAL_S": "0",
            "KFP_TRAINER_DELIVERY_BACKOFF_S": "0.1",
            "KFP_TRAINER_RETRY_AFTER_S": RETRY_AFTER_S,
            "K_SINK": sink.url,
        }
        self.checked = Gunicorn(
            {
                **common,
                **auth_env(self.api, self.token_file),
                "KFP_TRAINER_STATE_DIR": str(base / "a"),
            },
            base / "checked.log",
        )
        self.open = Gunicorn(
            {**common, "KFP_TRAINER_STATE_DIR": str(base / "b")}, base / "open.log", workers=1
        )

    def token(self, sa: tuple[str, str], **kwargs: Any) -> str:
        return self.api.service_account_token(
            *sa, audiences=kwargs.pop("audiences", [AUDIENCE]), **kwargs
        )

    def close(self) -> None:
        codes = [self.checked.stop(), self.open.stop()]
        self.api.close()
        assert codes == [0, 0], self.checked.log_tail()


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_store) -> Iterator[World]:
    with Sink() as sink:
        w = World(tmp_path_factory.mktemp("identity"), model_store, sink)
        try:
            w.checked.wait_ready()
            w.open.wait_ready()
            yield w
        finally:
            w.close()


def call(url: str, token: str | None, *args: str) -> tuple[int, dict[str, str], Any]:
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    status, headers, body = curl(*auth, *args)
    return status, headers, json.loads(body) if body else None


def post_event(url: str, token: str | None, event_type: str, data: Any, event_id: str = "e"):
    headers = ce_headers(event_type, event_id, source="/curl")
    return call(
        url,
        token,
        "-X",
        "POST",
        url + "/",
        *header_args(headers),
        "--data-binary",
        json.dumps(data),
    )


def get(url: str, token: str | None, path: str):
    return call(url, token, url + path)


def fake(world: World, job_uuid: str, **cfg: Any) -> dict[str, Any]:
    return request_data(job_uuid, world.dataset, logger_config={"fake": cfg})


# ------------------------------------------------------------------------------ 401


ROUTES = [("POST", "/"), ("GET", "/jobs"), ("GET", "/jobs/some-job"), ("GET", "/nowhere")]


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_no_token_is_a_401_on_every_route_but_health(world, method, path):
    url = world.checked.url
    args = ["-X", method, url + path]
    if method == "POST":
        args += [
            *header_args(ce_headers(contract.PING, "p", source="/curl")),
            "--data-binary",
            "{}",
        ]
    status, headers, body = call(url, None, *args)
    assert status == 401
    assert body == {
        "error": "unauthenticated",
        "message": "this endpoint needs an Authorization: Bearer <token> header",
    }
    assert headers["www-authenticate"].startswith("Bearer")
    assert headers["content-type"] == "application/json"


def test_health_routes_need_no_token(world):
    assert get(world.checked.url, None, "/healthz")[:1] == (200,)
    status, _, body = get(world.checked.url, None, "/readyz")
    assert (status, body["status"]) == (200, "ready")


def test_another_scheme_is_a_401(world):
    status, _, body = call(
        world.checked.url, None, "-H", "Authorization: Basic dTpw", world.checked.url + "/jobs"
    )
    assert (status, body["message"]) == (401, "the Authorization header must be 'Bearer <token>'")


BAD_TOKENS = {
    "expired": lambda w: w.token(READER, expires_in_s=-30),
    "wrong-audience": lambda w: w.token(READER, audiences=["https://kubernetes.default.svc"]),
    "forged": lambda w: TokenIssuer(w.api.issuer.issuer).issue(*READER, [AUDIENCE]),
    "not-a-token": lambda w: "hello",
}


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_a_token_the_api_server_does_not_vouch_for_is_a_401(world, kind):
    # A job that exists: the refusal must not say so.
    assert (
        post_event(
            world.checked.url,
            world.token(REQUESTER),
            contract.JOB_REQUESTED,
            fake(world, f"t401-{kind}"),
        )[0]
        == 200
    )
    token = BAD_TOKENS[kind](world)
    for status, _, body in (
        get(world.checked.url, token, f"/jobs/t401-{kind}"),
        post_event(
            world.checked.url, token, contract.JOB_CANCEL_REQUESTED, {"job_uuid": f"t401-{kind}"}
        ),
    ):
        assert status == 401
        assert body["error"] == "unauthenticated"
        assert body["message"] == (
            "the bearer token was not accepted (expired, for another audience, or not issued by "
            "this cluster)"
        )
        assert f"t401-{kind}" not in json.dumps(body)
    assert "job.cancelled" not in world.sink.types(f"t401-{kind}")


# ------------------------------------------------------------------------------ 403


def test_an_unlisted_service_account_is_a_403(world):
    token = world.token(STRANGER)
    status, _, body = post_event(
        world.checked.url, token, contract.JOB_REQUESTED, fake(world, "t403-a")
    )
    assert (status, body) == (
        403,
        {"error": "forbidden", "message": f"{user(STRANGER)} may not request or cancel jobs"},
    )
    status, _, body = get(world.checked.url, token, "/jobs/t403-a")
    assert (status, body["message"]) == (403, f"{user(STRANGER)} may not read job status")
    status, _, body = get(world.checked.url, token, "/nowhere")
    assert (status, body["message"]) == (403, f"{user(STRANGER)} may not call this handler")
    assert world.sink.types("t403-a") == []
    status, _, _ = get(world.checked.url, world.token(READER), "/jobs/t403-a")
    assert status == 404, "a refused request started nothing"


@pytest.mark.parametrize(
    ("caller", "event", "data", "doing"),
    [
        (READER, contract.JOB_REQUESTED, {"job_uuid": "x"}, "request or cancel jobs"),
        (NOTIFIER, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "x"}, "request or cancel jobs"),
        (REQUESTER, contract.RUN_FINISHED, {"job_uuid": "x"}, "send run.finished notices"),
        (READER, contract.PING, {}, "send reconcile ticks"),
    ],
    ids=["reader-requests", "notifier-cancels", "requester-notifies", "reader-pings"],
)
def test_a_listed_caller_may_do_only_what_it_is_listed_for(world, caller, event, data, doing):
    status, _, body = post_event(world.checked.url, world.token(caller), event, data)
    assert (status, body["message"]) == (403, f"{user(caller)} may not {doing}")


def test_the_requester_may_not_read_job_status(world):
    status, _, body = get(world.checked.url, world.token(REQUESTER), "/jobs")
    assert (status, body["message"]) == (403, f"{user(REQUESTER)} may not read job status")


def test_the_event_type_of_a_structured_event_decides_too(world, tmp_path):
    message = contract.to_http(
        contract.make_event(contract.JOB_REQUESTED, "/curl", fake(world, "t403-s")), structured=True
    )
    path = tmp_path / "event.json"
    path.write_bytes(message.body)
    args = [
        "-X",
        "POST",
        world.checked.url + "/",
        "-H",
        "Content-Type: application/cloudevents+json",
    ]
    args += ["--data-binary", f"@{path}"]
    assert call(world.checked.url, world.token(READER), *args)[0] == 403
    status, headers, _ = call(world.checked.url, world.token(REQUESTER), *args)
    assert (status, headers["ce-type"]) == (200, contract.JOB_SCHEDULED)


# ------------------------------------------------------------------------------ same answers


def _comparable(answer: tuple[int, dict[str, str], Any], state_dir: Path) -> tuple[Any, ...]:
    """An answer without what differs between two handlers by nature (times, run ids, their
    state directories, the other jobs this module's tests sent one of them)."""
    status, headers, body = answer

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: scrub(v) for k, v in value.items() if not k.endswith("_at") and k != "run_id"
            }
        if isinstance(value, list):
            return [scrub(v) for v in value if _about_same_1(v)]
        if isinstance(value, str):
            return value.replace(str(state_dir), "<state>")
        return value

    return status, headers.get("ce-type"), headers.get("ce-id"), scrub(body)


def _about_same_1(value: Any) -> bool:
    return not isinstance(value, dict) or value.get("job_uuid") in (None, "same-1")


def test_the_right_callers_get_the_same_answers_as_without_identity_checks(world):
    tokens = {
        "request": world.token(REQUESTER),
        "notify": world.token(NOTIFIER),
        "reconcile": world.token(RECONCILER),
        "read": world.token(READER),
    }
    job = fake(world, "same-1", steps=2)

    def script(url: str, checked: bool, state_dir: Path) -> list[tuple[Any, ...]]:
        def token(role: str) -> str | None:
            return tokens[role] if checked else None

        answers = [
            post_event(url, token("request"), contract.JOB_REQUESTED, job),
            post_event(url, token("request"), contract.JOB_REQUESTED, job),  # a redelivery
        ]
        wait_for(
            lambda: (get(url, token("read"), "/jobs/same-1")[2] or {}).get("status") == "completed",
            30,
            f"same-1 to complete at {url}",
        )
        answers += [
            get(url, token("read"), "/jobs/same-1"),
            get(url, token("read"), "/jobs"),
            get(url, token("read"), "/jobs/ghost"),
            post_event(url, token("notify"), contract.RUN_FINISHED, {"job_uuid": "same-1"}),
            post_event(url, token("reconcile"), contract.PING, {"reason": "reconcile"}),
            post_event(url, token("request"), contract.JOB_CANCEL_REQUESTED, {"job_uuid": "ghost"}),
            post_event(url, token("request"), "com.example.unknown", {}),
        ]
        return [_comparable(a, state_dir) for a in answers]

    checked = script(world.checked.url, True, world.base / "a")
    unchecked = script(world.open.url, False, world.base / "b")
    assert checked == unchecked
    assert [a[0] for a in checked] == [200, 200, 200, 200, 404, 202, 202, 400, 400]
    assert checked[0][1] == contract.JOB_SCHEDULED


# ------------------------------------------------------------------------------ limits

OTHER_REQUESTER = (NS, "tenant-b-oidc-eventing.knative.dev-trigger")


def test_a_caller_at_its_limit_gets_429_until_one_of_its_jobs_ends(world):
    """KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS=1: a second job of the same caller waits (429 with
    Retry-After, which Knative redelivers), a redelivery of the first and another caller's job
    do not; once the first job ends the second is taken."""
    env = {
        **world.common,
        **auth_env(world.api, world.token_file),
        "KFP_TRAINER_STATE_DIR": str(world.base / "limited"),
        "KFP_TRAINER_AUTH_REQUESTERS": f"{user(REQUESTER)},{user(OTHER_REQUESTER)}",
        "KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS": "1",
    }
    limited = Gunicorn(env, world.base / "limited.log")
    try:
        limited.wait_ready()
        url, mine, theirs = limited.url, world.token(REQUESTER), world.token(OTHER_REQUESTER)
        first = fake(world, "lim-1", steps=600, step_s=0.1)
        assert post_event(url, mine, contract.JOB_REQUESTED, first)[0] == 200
        status, headers, body = post_event(url, mine, contract.JOB_REQUESTED, fake(world, "lim-2"))
        assert (status, headers["retry-after"]) == (429, RETRY_AFTER_S)
        assert body == {
            "error": "too_many_runs",
            "message": f"{user(REQUESTER)} has 1 unfinished jobs, as many as "
            "KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS allows; this request is taken once one of them "
            "ends (retry later)",
        }
        assert get(url, world.token(READER), "/jobs/lim-2")[0] == 404, "nothing was queued"
        assert post_event(url, mine, contract.JOB_REQUESTED, first)[0] == 200  # redelivered
        assert post_event(url, theirs, contract.JOB_REQUESTED, fake(world, "lim-3"))[0] == 200
        assert post_event(url, mine, contract.JOB_CANCEL_REQUESTED, {"job_uuid": "lim-1"})[0] == 202
        wait_for(
            lambda: get(url, world.token(READER), "/jobs/lim-1")[2]["status"] == "cancelled",
            30,
            "lim-1 to end",
        )
        status, headers, _ = post_event(url, mine, contract.JOB_REQUESTED, fake(world, "lim-2"))
        assert (status, headers["ce-type"]) == (200, contract.JOB_SCHEDULED)
    finally:
        assert limited.stop() == 0, limited.log_tail()


# ------------------------------------------------------------------------------ the reviews


def test_reviews_are_cached_briefly_per_worker(world):
    token = world.token(READER)
    before = [r["token"] for r in world.api.reviews].count(token)
    for _ in range(8):
        assert get(world.checked.url, token, "/jobs")[0] == 200
    reviewed = [r["token"] for r in world.api.reviews].count(token) - before
    assert 1 <= reviewed <= 2, "one review per gunicorn worker, then the cached answer"
    assert world.api.reviews[-1]["audiences"] == [AUDIENCE]


def test_the_handler_presents_its_own_token_to_the_api_server(world):
    get(world.checked.url, world.token(READER), "/jobs")
    assert world.api.seen_auth[-1] == f"Bearer {world.token_file.read_text().strip()}"


def test_tokenreview_down_is_a_503_with_retry_after_then_works_again(world):
    world.api.stop()
    try:
        fresh = world.token(READER)  # never reviewed, so never cached
        status, headers, body = get(world.checked.url, fresh, "/jobs")
        assert status == 503
        assert headers["retry-after"] == RETRY_AFTER_S
        assert body == {
            "error": "unavailable",
            "message": "the caller's token cannot be checked right now (the Kubernetes API is "
            "not reachable from the handler); retry later",
        }
        status, headers, _ = post_event(
            world.checked.url, world.token(REQUESTER), contract.JOB_REQUESTED, fake(world, "t503")
        )
        assert (status, headers["retry-after"]) == (503, RETRY_AFTER_S)
    finally:
        world.api.start()
    assert get(world.checked.url, fresh, "/jobs")[0] == 200
    assert (
        post_event(
            world.checked.url, world.token(REQUESTER), contract.JOB_REQUESTED, fake(world, "t503")
        )[0]
        == 200
    )


def test_a_handler_that_may_not_review_tokens_answers_503_and_logs_why(world):
    world.api.revoke_token_review(HANDLER_USER)
    try:
        status, headers, _ = get(world.checked.url, world.token(READER), "/jobs")
        assert (status, headers["retry-after"]) == (503, RETRY_AFTER_S)
    finally:
        world.api.grant_token_review(HANDLER_USER)
    wait_for(
        lambda: any(
            r.get("msg") == "TokenReview refused"
            and "system:auth-delegator" in r.get("problem", "")
            for r in world.checked.log_lines()
        ),
        10,
        "the log line naming the missing permission",
    )
    assert get(world.checked.url, world.token(READER), "/jobs")[0] == 200


def test_no_token_reaches_the_logs(world):
    token = world.token(READER)
    get(world.checked.url, token, "/jobs")
    time.sleep(0.2)
    assert token not in world.checked.log_text()
    assert token.split(".")[2] not in world.checked.log_text()


# ------------------------------------------------------------------------------ units


def test_identity_checks_are_off_by_default(make_app, env):
    settings = HandlerSettings.from_env(env)
    assert settings.auth.enabled is False
    app = make_app(env)
    assert EXTENSION not in app.extensions
    assert app.test_client().get("/jobs").status_code == 200


def test_settings_name_a_bad_caller_and_refuse_plain_http():
    with pytest.raises(SettingsError, match=r"KFP_TRAINER_AUTH_READERS: 'llama-stack' is not a"):
        AuthSettings.from_env(
            {"KFP_TRAINER_AUTH_READERS": "system:serviceaccount:a:b, llama-stack"}
        )
    with pytest.raises(SettingsError, match="must be reached over https://"):
        AuthSettings.from_env({"KFP_TRAINER_AUTH": "true", "KFP_TRAINER_AUTH_API_URL": "http://k"})
    with pytest.raises(SettingsError, match="KFP_TRAINER_AUTH='maybe' is not a boolean"):
        AuthSettings.from_env({"KFP_TRAINER_AUTH": "maybe"})
    parsed = AuthSettings.from_env(
        {"KFP_TRAINER_AUTH_REQUESTERS": " system:serviceaccount:a:b ,system:serviceaccount:c:d.e"}
    )
    assert parsed.requesters == ("system:serviceaccount:a:b", "system:serviceaccount:c:d.e")


def test_bearer_token_and_event_type_read_the_message():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    message = contract.to_http(
        contract.make_event(contract.JOB_CANCEL_REQUESTED, "/t", {"job_uuid": "j"}),
        structured=True,
    )
    assert event_type(message) == contract.JOB_CANCEL_REQUESTED
    binary = contract.to_http(contract.make_event(contract.RUN_FINISHED, "/t", {"job_uuid": "j"}))
    assert event_type(binary) == contract.RUN_FINISHED


def test_the_policy_admits_each_list_for_its_action_only():
    from handler.errors import Forbidden
    from handler.identity import Action

    policy = Policy(
        AuthSettings(
            requesters=("system:serviceaccount:a:r",), readers=("system:serviceaccount:a:x",)
        )
    )
    policy.check(Caller("system:serviceaccount:a:r"), Action.REQUEST)
    policy.check(Caller("system:serviceaccount:a:x"), None)
    with pytest.raises(Forbidden):
        policy.check(Caller("system:serviceaccount:a:r"), Action.READ)
    with pytest.raises(Forbidden):
        policy.check(Caller("system:serviceaccount:a:other"), None)


def test_the_handler_sends_the_sinkbindings_token_to_the_broker(tmp_path):
    """As a sender itself (outbox, reconcile tick), the handler presents the token the
    SinkBinding mounts (KFP_TRAINER_SINK_TOKEN_PATH), read afresh for every event."""
    from handler.sink import SinkClient

    token = tmp_path / "oidc" / "token"
    event = contract.make_event(
        contract.JOB_STARTED, "/h", {"job_uuid": "s-1", "status": "in_progress"}
    )
    with Sink() as sink:
        client = SinkClient(sink.url, str(token))
        client.post(event)  # no file yet (OIDC off): no header
        token.parent.mkdir()
        token.write_text("for-the-broker-1\n")
        client.post(event)
        token.write_text("for-the-broker-2")  # renewed in place
        client.post(event)
        client.close()
        sent = [headers.get("authorization") for headers, _ in sink.received()]
    assert sent == [None, "Bearer for-the-broker-1", "Bearer for-the-broker-2"]
    assert HandlerSettings.from_env({}).sink_token_path == "/oidc/token"
