"""knative/networkpolicy.yaml: whom it admits, to which pods, and that the guide says how.

The schema check is test_manifests.py's (kubernetes-validate, like every core kind); here the
policy is read the way a CNI applies it: a connection is admitted when one ingress rule has a
peer that selects the source (namespace selector AND pod selector) and lists the port.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.knative import manifests as m
from tests.knative import schemas
from tests.support import REPO

DEPLOY_GUIDE = REPO / "docs" / "deploy.md"
QUEUE_PROXY_PORT = 8012  # Knative's queue-proxy, where requests enter a revision's pod
AUTOSCALER_METRICS_PORT = 9090
HANDLER_METRICS_PORT = 9095  # gunicorn's master (KFP_TRAINER_METRICS_PORT)


def policy() -> m.Doc:
    return m.one("NetworkPolicy", m.HANDLER, "networking.k8s.io")


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector against a label set (matchLabels and matchExpressions)."""
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def admitted(namespace_labels: dict[str, str], pod_labels: dict[str, str], port: int) -> bool:
    """Whether the policy admits a connection from a pod in another namespace to ``port``."""
    for rule in policy().body["spec"]["ingress"]:
        if not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "sources are label selectors, not addresses"
            # A peer with only a podSelector selects pods of the policy's own namespace.
            if "namespaceSelector" not in peer:
                continue
            if _selects(peer["namespaceSelector"], namespace_labels) and _selects(
                peer.get("podSelector"), pod_labels
            ):
                return True
    return False


def _label(name: str) -> dict[str, str]:
    return {f"kfp-trainer.llamastack.io/{name}": "true"}


def test_the_policy_validates_and_guards_ingress_only():
    doc = policy()
    assert schemas.checked_by(doc.body) == "kubernetes-validate"
    assert not schemas.check_file(m.KNATIVE_DIR / doc.file)
    assert doc.body["spec"]["policyTypes"] == ["Ingress"], "egress stays open (KFP, S3, Broker)"
    assert doc.file in m.kustomization()["resources"]


def test_it_selects_exactly_the_handler_services_pods():
    selector = policy().body["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}
    template_labels = m.handler_service().body["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"], "an empty podSelector would guard every pod"
    assert _selects(selector, template_labels), (
        f"podSelector {selector} does not match the Service's pod labels {template_labels}"
    )
    # The other Knative Services of the set (event display, dead letters) are not its business.
    for doc in m.find("Service", api_group="serving.knative.dev"):
        labels = doc.body["spec"]["template"].get("metadata", {}).get("labels", {})
        assert _selects(selector, labels) == (doc.name == m.HANDLER), doc.label


SOURCES = [
    # (what, namespace labels, pod labels, port)
    ("broker dispatcher", _label("eventing"), {"eventing.knative.dev/brokerRole": "filter"}, 8012),
    ("pingsource adapter", _label("eventing"), {"sources.knative.dev/role": "adapter"}, 8012),
    ("pipeline pod", _label("pipelines"), {"pipelines.kubeflow.org/v2_component": "true"}, 8012),
    ("llama-stack server", _label("llama-stack"), {"app": "llama-stack"}, 8012),
    ("activator", _label("serving"), {"app": "activator"}, 8012),
    ("ingress gateway", _label("ingress"), {"app": "3scale-kourier-gateway"}, 8012),
    ("autoscaler scrape", _label("serving"), {"app": "autoscaler"}, AUTOSCALER_METRICS_PORT),
    ("prometheus scrape", _label("monitoring"), {"app": "prometheus"}, HANDLER_METRICS_PORT),
]


@pytest.mark.parametrize(("what", "ns", "pod", "port"), SOURCES, ids=[s[0] for s in SOURCES])
def test_each_source_is_admitted(what, ns, pod, port):
    assert admitted(ns, pod, port), f"{what} is refused"


REFUSED = [
    ("a pod of an unlabelled namespace", {"team": "x"}, {"app": "activator"}, 8012),
    ("another pod of Knative Serving", _label("serving"), {"app": "controller"}, 8012),
    ("the autoscaler on the request port", _label("serving"), {"app": "autoscaler"}, 8012),
    ("the activator on the metrics port", _label("serving"), {"app": "activator"}, 9090),
    ("the llama-stack server on the container port", _label("llama-stack"), {}, 8080),
    ("prometheus on the request port", _label("monitoring"), {}, 8012),
    ("the broker dispatcher on the admin port", _label("eventing"), {}, 8022),
    ("a label set to false", {"kfp-trainer.llamastack.io/eventing": "false"}, {}, 8012),
]


@pytest.mark.parametrize(("what", "ns", "pod", "port"), REFUSED, ids=[s[0] for s in REFUSED])
def test_everyone_else_is_refused(what, ns, pod, port):
    assert not admitted(ns, pod, port), f"{what} is admitted"


def test_requests_are_admitted_on_the_queue_proxy_port_only():
    ports = {p["port"] for rule in policy().body["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {QUEUE_PROXY_PORT, AUTOSCALER_METRICS_PORT, HANDLER_METRICS_PORT}
    assert m.container_port() not in ports, "the user container is reached through queue-proxy"


def test_the_default_namespace_is_labelled_for_its_own_pipeline_pods():
    """The set installs next to the DSPA (KFP_NAMESPACE = the namespace), so its pipeline pods
    are this namespace's, and namespace.yaml carries the pipelines label."""
    assert m.config_map_data()["KFP_NAMESPACE"] == m.namespace()
    labels = m.one("Namespace", m.namespace(), "").body["metadata"]["labels"]
    assert admitted(labels, {}, QUEUE_PROXY_PORT)
    assert not admitted(labels, {}, AUTOSCALER_METRICS_PORT)


def _selector_labels() -> set[tuple[str, str]]:
    pairs = set()
    for rule in policy().body["spec"]["ingress"]:
        for peer in rule["from"]:
            for selector in (peer.get("namespaceSelector"), peer.get("podSelector")):
                assert not (selector or {}).get("matchExpressions"), "keep selectors matchLabels"
                pairs |= set((selector or {}).get("matchLabels", {}).items())
    return pairs


def test_the_deployment_guide_names_every_label_the_policy_selects():
    guide = DEPLOY_GUIDE.read_text(encoding="utf-8")
    section = guide.split("## Network policy", 1)[1].split("\n## ", 1)[0]
    pairs = _selector_labels()
    assert len(pairs) >= 7
    missing = [f"{k}={v}" for k, v in sorted(pairs) if f"{k}={v}" not in section]
    assert not missing, f"docs/deploy.md 'Network policy' does not name: {missing}"
    # Every namespace label is one the guide tells the installer to set, with kubectl.
    commands = re.findall(r"kubectl label namespace \S+ (\S+)=(\S+)", section)
    namespace_labels = {
        pair
        for rule in policy().body["spec"]["ingress"]
        for peer in rule["from"]
        for pair in peer["namespaceSelector"]["matchLabels"].items()
    }
    assert namespace_labels == set(commands)
