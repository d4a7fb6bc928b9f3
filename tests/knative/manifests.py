"""Reading knative/ the way kubectl and the API server would, for the manifest tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.knative import schemas
from tests.support import REPO

KNATIVE_DIR = REPO / "knative"
K8S_VERSION = schemas.K8S_VERSION


@dataclass(frozen=True)
class Doc:
    """One YAML document of knative/, with the file it came from."""

    file: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def api_version(self) -> str:
        return self.body["apiVersion"]

    @property
    def label(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    """Every YAML file in knative/ except the kustomization itself."""
    files = sorted(KNATIVE_DIR.glob("*.y*ml"))
    return [f for f in files if f.name not in ("kustomization.yaml", "kustomization.yml")]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KNATIVE_DIR / "kustomization.yaml").read_text(encoding="utf-8"))


@cache
def documents() -> tuple[Doc, ...]:
    """All documents, loaded as the API server reads them (duplicate keys rejected, dates kept)."""
    docs = []
    for path in manifest_files():
        for body in schemas.load_documents(path.read_text(encoding="utf-8")):
            docs.append(Doc(path.name, body))
    return tuple(docs)


def find(kind: str, name: str | None = None, api_group: str | None = None) -> list[Doc]:
    """Documents of a kind (optionally a name, and an API group: "" for core)."""
    out = []
    for doc in documents():
        group = doc.api_version.rpartition("/")[0]
        if doc.kind != kind or (name is not None and doc.name != name):
            continue
        if api_group is not None and group != api_group:
            continue
        out.append(doc)
    return out


def one(kind: str, name: str, api_group: str | None = None) -> Doc:
    found = find(kind, name, api_group)
    assert len(found) == 1, f"expected exactly one {kind}/{name} in knative/, found {len(found)}"
    return found[0]


def resolve_ref(ref: dict[str, Any]) -> Doc:
    """The document a Knative destination `ref` (apiVersion, kind, name) points at."""
    group = ref["apiVersion"].rpartition("/")[0]
    found = [d for d in find(ref["kind"], ref["name"], group) if d.api_version == ref["apiVersion"]]
    assert found, f"ref {ref} names nothing defined in knative/"
    return found[0]


# -- the handler as knative/ deploys it ------------------------------------------------------

HANDLER = "kfp-trainer-handler"
BROKER = "kfp-trainer"
KSVC_API = "serving.knative.dev/v1"


def namespace() -> str:
    return kustomization()["namespace"]


def handler_service() -> Doc:
    return one("Service", HANDLER, "serving.knative.dev")


def handler_container() -> dict[str, Any]:
    containers = handler_service().body["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the handler Service runs exactly one container"
    return containers[0]


def config_map_data() -> dict[str, str]:
    """Every variable the handler container gets through envFrom ConfigMaps."""
    data: dict[str, str] = {}
    for source in handler_container().get("envFrom", []):
        ref = source["configMapRef"]
        data.update(one("ConfigMap", ref["name"], "").body["data"])
    return data


def secret_refs() -> dict[str, dict[str, Any]]:
    """env name -> secretKeyRef, for every env var the handler reads from a Secret."""
    refs = {}
    for env in handler_container().get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[env["name"]] = ref
    return refs


def container_port() -> int:
    (port,) = handler_container()["ports"]
    return port["containerPort"]


def deployed_env() -> dict[str, str]:
    """The container's environment as Knative builds it; secrets get placeholder values."""
    env = dict(config_map_data())
    for entry in handler_container().get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    for name in secret_refs():
        env[name] = f"<{name}>"
    env["K_SINK"] = (
        f"http://broker-ingress.knative-eventing.svc.cluster.local/{namespace()}/{BROKER}"
    )
    env["PORT"] = str(container_port())
    return env


# -- who calls the handler (Knative's authentication-oidc) ---------------------------------

LONGEST_NAME = 63  # past it Knative hashes an account's name (kmeta.ChildName)


def oidc_account(doc: Doc) -> tuple[str, str]:
    """(namespace, name) of the service account Knative gives a Trigger or source for OIDC."""
    group = doc.api_version.rpartition("/")[0]
    name = f"{doc.name}-oidc-{group}-{doc.kind}".lower()
    assert len(name) <= LONGEST_NAME, f"{doc.label}: Knative would hash its account name {name}"
    return namespace(), name


def handler_senders() -> list[tuple[Doc, dict[str, Any]]]:
    """Every Trigger and source that delivers to the handler, with its destination."""
    found = []
    for doc in (*find("Trigger"), *find("PingSource")):
        spec = doc.body["spec"]
        destination = spec.get("subscriber") or spec["sink"]
        if destination["ref"]["name"] == HANDLER:
            found.append((doc, destination))
    return found


def trigger_types(trigger: Doc) -> list[str]:
    """The exact `type` values a Trigger lets through (filter.attributes or filters/any/exact)."""
    spec = trigger.body["spec"]
    if "filters" in spec:
        assert "filter" not in spec, f"{trigger.label}: `filters` silently overrides `filter`"
        (expr,) = spec["filters"]
        branches = expr.get("any", [expr])
        assert branches, f"{trigger.label}: `any` must hold at least one expression"
        types = []
        for branch in branches:
            assert set(branch) == {"exact"}, f"{trigger.label}: unexpected dialect {branch}"
            assert set(branch["exact"]) == {"type"}, f"{trigger.label}: filter on type only"
            types.append(branch["exact"]["type"])
        return types
    attributes = spec["filter"]["attributes"]
    assert set(attributes) == {"type"}, f"{trigger.label}: filter on type only"
    return [attributes["type"]]
