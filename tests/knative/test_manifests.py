"""knative/ against the real Knative CRD schemas, the Kubernetes API schemas and each other.

No cluster runs here, so every rule a cluster would enforce at apply time (schemas) and every
rule the handler relies on at run time (names, env, ports, event types) is checked offline.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from handler import contract
from handler.settings import ENV_VARS as HANDLER_ENV_VARS
from handler.settings import HandlerSettings
from pipelines.settings import ENV_VARS as PIPELINE_ENV_VARS
from pipelines.settings import PipelineSettings
from tests.knative import manifests as m
from tests.knative import schemas

GUNICORN_CONF = m.REPO / "handler" / "gunicorn_conf.py"

HANDLER = m.HANDLER
BROKER = m.BROKER
KSVC_API = m.KSVC_API

# Handler settings a remote deployment deliberately leaves unset, and why. Anything else in
# handler/settings.py ENV_VARS must be provided, so a new setting fails here until it is.
NOT_SET_REMOTELY = {
    "KFP_TRAINER_SINK": "K_SINK from the SinkBinding takes its place",
    "K_CE_OVERRIDES": "injected by the SinkBinding only when it sets ceOverrides (none needed)",
    "KFP_TRAINER_LOCAL_WORKERS": "local mode only",
    "KFP_TRAINER_BACKEND": "local mode only (remote mode runs every job on KFP)",
    # Remote mode keeps no store: nothing of local mode's SQLite store and outbox applies.
    "KFP_TRAINER_STATE_DIR": "local mode's store only",
    "KFP_TRAINER_DB": "local mode's store only",
    "KFP_TRAINER_DB_SYNC": "local mode's store only",
    "KFP_TRAINER_DB_BUSY_TIMEOUT_S": "local mode's store only",
    "KFP_TRAINER_DELIVERY_ATTEMPTS": "local mode's outbox only (remote: the Broker retries)",
    "KFP_TRAINER_DELIVERY_BACKOFF_S": "local mode's outbox only (remote: the Broker retries)",
    "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S": "local mode's outbox only (remote: the Broker retries)",
}
# Injected by Knative itself rather than by our manifests.
INJECTED = {"K_SINK": "SinkBinding", "PORT": "Knative Serving (= containerPort)"}


handler_service = m.handler_service
handler_container = m.handler_container
namespace = m.namespace


# ------------------------------------------------------------------------------ schemas


def test_every_file_loads_and_holds_documents():
    files = m.manifest_files()
    assert files, "knative/ holds no manifests"
    for path in files:
        assert any(d.file == path.name for d in m.documents()), f"{path.name} holds no document"


@pytest.mark.parametrize("path", m.manifest_files(), ids=lambda p: p.name)
def test_every_document_validates_against_its_schema(path):
    """Knative kinds against the upstream CRDs (tests/knative/crds/), the rest with
    kubernetes-validate; tests/knative/test_schemas.py shows each check can fail."""
    problems = schemas.check_file(path)
    assert not problems, "\n".join(problems)


def _is_knative(doc: m.Doc) -> bool:
    return doc.api_version.rpartition("/")[0].endswith(".knative.dev")


def test_every_document_is_checked_by_one_of_the_validators():
    for doc in m.documents():
        # Knative kinds get a CRD schema; everything else is a core kind.
        expected = "crd" if _is_knative(doc) else "kubernetes-validate"
        assert schemas.checked_by(doc.body) == expected, doc.label
    assert sum(map(_is_knative, m.documents())) >= 8
    assert sum(not _is_knative(d) for d in m.documents()) >= 7


def test_kustomization_image_override_names_the_handler_image():
    (override,) = m.kustomization()["images"]
    image = handler_container()["image"]
    assert image.rsplit(":", 1)[0] == override["name"]


def test_kubernetes_version_is_one_kubernetes_validate_ships():
    assert m.K8S_VERSION in {kv_utils.major_minor(v) for v in kv_utils.all_versions()}


# ------------------------------------------------------------------------------ kustomization


def test_kustomization_lists_every_manifest_exactly_once():
    listed = m.kustomization()["resources"]
    assert len(listed) == len(set(listed)), f"duplicates in kustomization.yaml: {listed}"
    on_disk = {p.name for p in m.manifest_files()}
    assert set(listed) == on_disk, (
        f"not listed: {sorted(on_disk - set(listed))}; missing files: "
        f"{sorted(set(listed) - on_disk)}"
    )


def test_names_are_unique_and_namespace_comes_from_the_kustomization():
    seen: set[tuple[str, str, str]] = set()
    for doc in m.documents():
        key = (doc.api_version.rpartition("/")[0], doc.kind, doc.name)
        assert key not in seen, f"{doc.label} defined twice"
        seen.add(key)
        ns = doc.body["metadata"].get("namespace")
        assert ns in (None, namespace()), f"{doc.label} pins namespace {ns!r}"
    assert (
        m.one("Namespace", namespace(), "").body["metadata"]["labels"][
            "bindings.knative.dev/include"
        ]
        == "true"
    ), "SinkBinding inclusion mode needs the namespace label"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_the_whole_set():
    out = subprocess.run(
        ["kubectl", "kustomize", str(m.KNATIVE_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(m.documents())
    for doc in built:
        if doc["kind"] not in ("Namespace", "ClusterRoleBinding"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == namespace(), doc["metadata"]["name"]
    image_override = m.kustomization()["images"][0]
    service = next(
        d
        for d in built
        if d["kind"] == "Service"
        and d["apiVersion"] == KSVC_API
        and d["metadata"]["name"] == HANDLER
    )
    image = service["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{image_override['name']}:{image_override['newTag']}"


# ------------------------------------------------------------------------------ cross-references


def test_handler_triggers_name_the_broker_and_the_handler_service():
    for trigger in m.find("Trigger"):
        assert trigger.body["spec"]["broker"] == BROKER, trigger.label
        m.one("Broker", BROKER)
        target = m.resolve_ref(trigger.body["spec"]["subscriber"]["ref"])
        assert target.api_version == KSVC_API, f"{trigger.label} subscriber is not a ksvc"


def test_one_trigger_per_consumed_type_and_each_delivers_to_the_handler():
    to_handler = [
        t for t in m.find("Trigger") if t.body["spec"]["subscriber"]["ref"]["name"] == HANDLER
    ]
    types = [typ for t in to_handler for typ in m.trigger_types(t)]
    assert sorted(types) == sorted(contract.BROKER_CONSUMED_TYPES)
    assert all(len(m.trigger_types(t)) == 1 for t in to_handler)


def test_completion_trigger_matches_exactly_the_terminal_types():
    others = [
        t for t in m.find("Trigger") if t.body["spec"]["subscriber"]["ref"]["name"] != HANDLER
    ]
    assert len(others) == 1, "one Trigger carries the completion types"
    assert sorted(m.trigger_types(others[0])) == sorted(contract.TERMINAL_TYPES)
    assert set(contract.TERMINAL_TYPES) <= set(contract.EMITTED_TYPES)
    subscriber = m.resolve_ref(others[0].body["spec"]["subscriber"]["ref"])
    assert subscriber.name != HANDLER


def test_no_trigger_loops_emitted_events_back_into_the_handler():
    for trigger in m.find("Trigger"):
        if trigger.body["spec"]["subscriber"]["ref"]["name"] == HANDLER:
            assert not set(m.trigger_types(trigger)) & set(contract.EMITTED_TYPES)


_ISO_DURATION = re.compile(r"^P(?!$)(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$")


@pytest.mark.parametrize("doc", [*m.find("Trigger"), *m.find("Broker")], ids=lambda d: d.label)
def test_delivery_retries_with_exponential_backoff_into_a_dead_letter_sink(doc):
    delivery = doc.body["spec"]["delivery"]
    assert isinstance(delivery["retry"], int) and delivery["retry"] >= 3
    assert delivery["backoffPolicy"] == "exponential"
    assert _ISO_DURATION.match(delivery["backoffDelay"]), delivery["backoffDelay"]
    dls = m.resolve_ref(delivery["deadLetterSink"]["ref"])
    assert dls.name != HANDLER, "dead letters must not go back to the handler"


def test_sinkbinding_binds_the_handler_service_to_the_broker():
    (binding,) = m.find("SinkBinding")
    subject = binding.body["spec"]["subject"]
    assert subject == {"apiVersion": KSVC_API, "kind": "Service", "name": HANDLER}
    handler_service()  # exists
    sink = m.resolve_ref(binding.body["spec"]["sink"]["ref"])
    assert (sink.kind, sink.name) == ("Broker", BROKER)


def test_pingsource_sends_the_reconcile_tick_straight_to_the_handler():
    (ping,) = m.find("PingSource")
    spec = ping.body["spec"]
    target = m.resolve_ref(spec["sink"]["ref"])
    assert (target.api_version, target.name) == (KSVC_API, HANDLER)
    fields = spec["schedule"].split()
    assert len(fields) == 5, f"schedule {spec['schedule']!r} is not a 5-field cron expression"
    assert spec["contentType"] == "application/json"
    assert isinstance(json.loads(spec["data"]), dict)
    assert contract.PING in contract.CONSUMED_TYPES


def test_service_account_and_its_role_binding_exist():
    sa_name = handler_service().body["spec"]["template"]["spec"]["serviceAccountName"]
    m.one("ServiceAccount", sa_name, "")
    bindings = [
        b
        for b in m.find("RoleBinding")
        if {"kind": "ServiceAccount", "name": sa_name, "namespace": namespace()}
        in b.body["subjects"]
    ]
    assert bindings, f"no RoleBinding binds ServiceAccount {sa_name} in {namespace()}"
    for binding in bindings:
        role = binding.body["roleRef"]
        assert role["kind"] == "Role"
        m.one("Role", role["name"])


def _rule(resource: str) -> dict[str, Any]:
    role = m.one("Role", HANDLER)
    (rule,) = [r for r in role.body["rules"] if resource in r["resources"]]
    return rule


def test_role_lets_the_handler_read_exactly_the_configured_dspa():
    from handler.remote import discovery

    dspa = _config_map_data()["KFP_DSPA_NAME"]
    rule = _rule(discovery.DSPA_PLURAL)
    assert rule["apiGroups"] == [discovery.DSPA_GROUP]
    assert rule["resourceNames"] == [dspa] and rule["verbs"] == ["get"]
    route = _rule("routes")  # the DSPA oauth-proxy's access check
    assert route["resourceNames"] == [f"ds-pipeline-{dspa}"] and route["verbs"] == ["get"]
    role = m.one("Role", HANDLER)
    resources = {r for rule in role.body["rules"] for r in rule["resources"]}
    assert "secrets" not in resources, "credentials come as env vars, not through the API"


# ------------------------------------------------------------------------------ env and secrets


_config_map_data = m.config_map_data
_secret_refs = m.secret_refs


def _provided_env() -> set[str]:
    plain = {e["name"] for e in handler_container().get("env", [])}
    return plain | set(_config_map_data()) | set(INJECTED)


def test_config_map_values_are_strings():
    for key, value in _config_map_data().items():
        assert isinstance(value, str), f"ConfigMap value {key} must be a string, not {value!r}"


def test_every_handler_setting_a_remote_deployment_needs_is_provided():
    missing = set(HANDLER_ENV_VARS) - _provided_env() - set(NOT_SET_REMOTELY)
    assert not missing, f"handler settings not provided by knative/: {sorted(missing)}"
    needlessly_excused = set(NOT_SET_REMOTELY) & _provided_env()
    assert not needlessly_excused, f"provided after all: {sorted(needlessly_excused)}"
    assert set(NOT_SET_REMOTELY) <= set(HANDLER_ENV_VARS), "excuse for a setting that is gone"


def test_every_pipeline_setting_is_provided():
    missing = set(PIPELINE_ENV_VARS) - _provided_env()
    assert not missing, f"pipeline settings not provided by knative/: {sorted(missing)}"


def _gunicorn_env_vars() -> set[str]:
    """The variables handler/gunicorn_conf.py reads (it has no ENV_VARS tuple of its own)."""
    source = GUNICORN_CONF.read_text(encoding="utf-8")
    return set(re.findall(r"""(?:_int\(|environ\.get\()\s*["']([A-Z0-9_]+)["']""", source))


def test_provided_env_has_no_unknown_names():
    known = (
        set(HANDLER_ENV_VARS)
        | set(PIPELINE_ENV_VARS)
        | _gunicorn_env_vars()
        | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    )
    unknown = _provided_env() - known - set(INJECTED)
    assert not unknown, f"env nobody reads (typo?): {sorted(unknown)}"


_deployed_env = m.deployed_env


def test_the_settings_parse_from_the_deployed_environment():
    settings = HandlerSettings.from_env(_deployed_env())
    assert settings.mode == "remote"
    assert settings.sink.endswith(f"/{namespace()}/{BROKER}")
    assert settings.remote.kfp_token == "<KFP_TOKEN>"
    assert settings.remote.s3_bucket
    pipeline = PipelineSettings.from_env(_deployed_env())
    assert pipeline.base_image == _config_map_data()["KFP_TRAINER_BASE_IMAGE"]
    assert pipeline.s3_secret_name == settings.remote.s3_secret_name


def test_secret_refs_name_template_secrets_and_their_declared_keys():
    refs = _secret_refs()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN"} <= set(refs)
    used: dict[str, set[str]] = {}
    for env_name, ref in refs.items():
        secret = m.one("Secret", ref["name"], "").body
        annotations = secret["metadata"].get("annotations", {})
        required = _keys(annotations, "required-keys")
        optional = _keys(annotations, "optional-keys")
        assert ref["key"] in required | optional, f"{env_name}: key {ref['key']} not declared"
        assert bool(ref.get("optional")) == (ref["key"] in optional), (
            f"{env_name}: `optional` must match the Secret's declaration"
        )
        used.setdefault(ref["name"], set()).add(ref["key"])
    for secret in m.find("Secret", api_group=""):
        declared = _keys(secret.body["metadata"].get("annotations", {}), "required-keys")
        declared |= _keys(secret.body["metadata"].get("annotations", {}), "optional-keys")
        assert declared == used.get(secret.name, set()), f"{secret.label}: unused declared keys"


def _keys(annotations: dict[str, str], what: str) -> set[str]:
    raw = annotations.get(f"kfp-trainer.llamastack.io/{what}", "")
    return {k.strip() for k in raw.split(",") if k.strip()}


def test_secret_templates_carry_no_values():
    secrets = m.find("Secret", api_group="")
    assert {s.name for s in secrets} >= {"kfp-trainer-s3", "kfp-trainer-kfp"}
    for secret in secrets:
        assert not set(secret.body) & {"data", "stringData"}, f"{secret.label} carries values"


def test_s3_secret_for_the_training_task_is_the_template():
    name = _config_map_data()["KFP_TRAINER_S3_SECRET"]
    secret = m.one("Secret", name, "").body
    required = _keys(secret["metadata"]["annotations"], "required-keys")
    assert required == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_runs_post_their_notice_to_the_broker_that_routes_it_to_the_handler():
    """Empty KFP_TRAINER_NOTIFY_URL: K_SINK, the Broker; the run.finished Trigger takes it on."""
    assert _config_map_data()["KFP_TRAINER_NOTIFY_URL"] == ""
    settings = HandlerSettings.from_env(_deployed_env())
    assert settings.sink.endswith(f"/{namespace()}/{BROKER}")
    (trigger,) = [t for t in m.find("Trigger") if contract.RUN_FINISHED in m.trigger_types(t)]
    assert trigger.body["spec"]["subscriber"]["ref"]["name"] == HANDLER
    assert _config_map_data()["KFP_NAMESPACE"] == namespace()
    labels = handler_service().body["metadata"]["labels"]
    assert labels.get("networking.knative.dev/visibility") == "cluster-local"


def test_reconcile_period_is_the_pingsources():
    (ping,) = m.find("PingSource")
    minute, *rest = ping.body["spec"]["schedule"].split()
    assert rest == ["*", "*", "*", "*"] and minute.startswith("*/"), "every N minutes"
    period_s = int(minute.removeprefix("*/")) * 60
    assert float(_config_map_data()["KFP_TRAINER_RECONCILE_PERIOD_S"]) == period_s


def test_handler_runs_remote_mode_under_its_service_account():
    assert _config_map_data()["KFP_TRAINER_MODE"] == "remote"
    spec = handler_service().body["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == HANDLER


# ------------------------------------------------------------------------------ scaling, resources


def test_scales_to_zero_and_out_with_max_scale_a_setting_resources_and_non_root():
    template = handler_service().body["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert "autoscaling.knative.dev/min-scale" not in annotations, "no pin: it scales to zero"
    assert "autoscaling.knative.dev/initial-scale" not in annotations
    assert int(annotations["autoscaling.knative.dev/max-scale"]) > 1, "a ceiling, not a pin"
    assert template["spec"]["containerConcurrency"] >= 1
    resources = handler_container()["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    assert handler_container()["securityContext"]["runAsNonRoot"] is True


# ------------------------------------------------------------------------------ the handler


def _gunicorn_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """handler/gunicorn_conf.py evaluated in the deployed environment."""
    for name in _gunicorn_env_vars() | {"GUNICORN_BIND"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in _deployed_env().items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(GUNICORN_CONF))


def test_gunicorn_reads_only_what_the_deployment_may_set():
    assert {"PORT", "GUNICORN_WORKERS", "GUNICORN_THREADS"} <= _gunicorn_env_vars()


def test_gunicorn_listens_on_the_container_port(monkeypatch):
    config = _gunicorn_config(monkeypatch)
    assert config["bind"] == [f"0.0.0.0:{m.container_port()}"]
    assert handler_container()["ports"][0]["name"] == "http1", "Knative's HTTP/1.1 port name"


def test_container_concurrency_is_what_gunicorn_serves_at_once(monkeypatch):
    config = _gunicorn_config(monkeypatch)
    spec = handler_service().body["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == config["workers"] * config["threads"]


def test_graceful_shutdown_fits_in_the_termination_grace_period(monkeypatch):
    config = _gunicorn_config(monkeypatch)
    spec = handler_service().body["spec"]["template"]["spec"]
    assert config["graceful_timeout"] < spec["timeoutSeconds"]


def _routes(tmp_path) -> dict[str, set[str]]:
    """path -> methods of the Flask app built from the deployed environment (in a subprocess,
    which also reports whether building it imported torch)."""
    env = {**_deployed_env(), "KFP_TRAINER_STATE_DIR": str(tmp_path / "state")}
    script = (
        "import json, sys\n"
        "from handler import create_app\n"
        "from handler.settings import HandlerSettings\n"
        "app = create_app(HandlerSettings.from_env(json.loads(sys.argv[1])))\n"
        "routes = {}\n"
        "for rule in app.url_map.iter_rules():\n"
        "    routes.setdefault(rule.rule, []).extend(sorted(rule.methods))\n"
        "print(json.dumps({'routes': routes, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(env)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False, "building the handler app imported torch"
    return {path: set(methods) for path, methods in result["routes"].items()}


def test_probes_port_and_notify_url_match_the_handlers_routes(tmp_path):
    routes = _routes(tmp_path)
    for probe in ("livenessProbe", "readinessProbe"):
        get = handler_container()[probe]["httpGet"]
        assert "GET" in routes.get(get["path"], set()), f"{probe} {get['path']} is no GET route"
        assert get.get("port") in (None, m.container_port()), f"{probe} probes another port"
    assert handler_container()["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert handler_container()["readinessProbe"]["httpGet"]["path"] == "/readyz"
    notify = urlsplit(_config_map_data()["KFP_TRAINER_NOTIFY_URL"]).path or "/"
    assert "POST" in routes.get(notify, set()), f"KFP_TRAINER_NOTIFY_URL path {notify} is no POST"
    # Triggers, the PingSource and the SinkBinding's broker deliver to the ksvc root.
    assert "POST" in routes.get("/", set())
    for doc in (*m.find("Trigger"), *m.find("PingSource")):
        spec = doc.body["spec"]
        destination = spec.get("subscriber") or spec["sink"]
        if destination["ref"]["name"] == HANDLER:
            assert destination.get("uri") in (None, "/"), f"{doc.label} posts to another path"


def test_model_store_is_where_upload_model_puts_models():
    from handler.remote import s3

    settings = HandlerSettings.from_env(_deployed_env())
    assert settings.model_store == s3.model_store(settings.remote)
