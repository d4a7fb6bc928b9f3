"""knative/: who may call the handler, declared once and checked against the senders.

With Knative Eventing's ``authentication-oidc`` feature every Trigger and source sends a token
of its own service account (``<name>-oidc-<group>-<kind>``) for its destination's audience.
The handler's caller lists (config.yaml) must name exactly those accounts, each for what its
sender delivers, and the senders must ask for the handler's audience; the Broker's audience is
what the pipeline's tasks and the SinkBinding's token are for.
"""

from __future__ import annotations

from handler.identity import EVENT_ACTIONS, Action
from handler.settings import HandlerSettings
from pipelines.settings import PipelineSettings
from tests.knative import manifests as m


def _settings() -> HandlerSettings:
    return HandlerSettings.from_env(m.deployed_env())


def _user(doc: m.Doc) -> str:
    return "system:serviceaccount:{}:{}".format(*m.oidc_account(doc))


def test_identity_checks_are_on_in_the_deployment():
    auth = _settings().auth
    assert auth.enabled and auth.api_url.startswith("https://")
    assert auth.token_path.endswith("/serviceaccount/token")
    assert auth.ca_path.endswith("/serviceaccount/ca.crt")


def test_every_sender_to_the_handler_asks_for_the_handlers_audience():
    senders = m.handler_senders()
    assert len(senders) == 4  # requests, cancels, run.finished, the tick
    for doc, destination in senders:
        assert destination.get("audience") == _settings().auth.audience, doc.label


def test_the_caller_lists_name_exactly_the_senders_accounts_for_what_they_send():
    expected: dict[Action, set[str]] = {action: set() for action in Action}
    for doc, _ in m.handler_senders():
        types = m.trigger_types(doc) if doc.kind == "Trigger" else ["dev.knative.sources.ping"]
        for event_type in types:
            expected[EVENT_ACTIONS[event_type]].add(_user(doc))
    auth = _settings().auth
    declared = {
        Action.REQUEST: set(auth.requesters),
        Action.NOTIFY: set(auth.notifiers),
        Action.RECONCILE: set(auth.reconcilers),
    }
    assert declared == {a: expected[a] for a in declared}
    assert auth.readers, "the llama-stack server must be allowed to read job status"


def test_what_the_tasks_and_the_sinkbinding_post_to_carries_a_token_for_the_broker():
    settings = _settings()
    broker_audience = f"eventing.knative.dev/broker/{m.namespace()}/{m.BROKER}"
    assert PipelineSettings.from_env(m.deployed_env()).token_audience == broker_audience
    assert settings.remote.notify_url == "", "the notice goes to K_SINK, the Broker"
    assert settings.sink.endswith(f"/{m.namespace()}/{m.BROKER}")
    assert settings.sink_token_path == "/oidc/token", "where the SinkBinding mounts its token"


def test_the_handler_may_review_tokens_and_the_runner_may_ask_for_its_own():
    (delegation,) = m.find("ClusterRoleBinding")
    sa_name = m.handler_service().body["spec"]["template"]["spec"]["serviceAccountName"]
    assert delegation.body["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    assert delegation.body["subjects"] == [
        {"kind": "ServiceAccount", "name": sa_name, "namespace": m.namespace()}
    ]
    runner = f"pipeline-runner-{m.config_map_data()['KFP_DSPA_NAME']}"
    role = m.one("Role", "kfp-trainer-pipeline-token")
    assert role.body["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts/token"],
            "resourceNames": [runner],
            "verbs": ["create"],
        }
    ]
    binding = m.one("RoleBinding", "kfp-trainer-pipeline-token")
    assert binding.body["roleRef"]["name"] == role.name
    assert binding.body["subjects"] == [
        {"kind": "ServiceAccount", "name": runner, "namespace": m.namespace()}
    ]
