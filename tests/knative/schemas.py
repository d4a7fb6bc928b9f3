"""What the API server checks when knative/ is applied, checked offline.

Knative kinds go against the upstream CRDs carried in ``crds/`` (``crds/SOURCES.md`` names the
release of each): every version a CRD declares becomes a JSON Schema, derived from its
``openAPIV3Schema`` the way the API server reads a structural schema under strict field
validation (kubectl's default), and ``jsonschema`` checks documents against it:

* an object accepts only its declared fields unless it says
  ``x-kubernetes-preserve-unknown-fields: true`` (then undeclared fields pass, declared ones are
  still typed);
* ``x-kubernetes-int-or-string`` is an integer or a string, ``nullable`` also accepts null,
  ``x-kubernetes-embedded-resource`` also allows apiVersion/kind/metadata,
  ``x-kubernetes-list-type: set`` holds unique items;
* ``metadata`` is Kubernetes' own ObjectMeta (the strict schema kubernetes-validate ships), and
  ``metadata.name`` a DNS-1123 subdomain;
* a kind or version the CRDs do not serve fails, and so does a deprecated version.

Every other kind goes through ``kubernetes-validate`` (strict) for :data:`K8S_VERSION`.
Admission-webhook rules (a Trigger names a broker, a schedule parses) are not in the schemas;
the manifest tests check the ones this project relies on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv_utils

from tests.support import REPO

CRD_DIR = Path(__file__).with_name("crds")
# Kubernetes version the core kinds (and every document's ObjectMeta) are checked against.
K8S_VERSION = "1.33"

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = _K8S_DEFINITIONS + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_MAX_MESSAGE_CHARS = 200
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------ YAML


class _ApiServerLoader(yaml.SafeLoader):
    """YAML as the API server reads it: a duplicate key is an error, a date is a string."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable key; the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ApiServerLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# A plain "=" resolves to YAML 1.1's "value" tag; JSON has no such thing, so it is a string.
_ApiServerLoader.add_constructor(
    "tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node)
)


def load_documents(text: str) -> list[Any]:
    """The non-empty documents of a YAML stream; raises yaml.YAMLError on any error."""
    return [doc for doc in yaml.load_all(text, Loader=_ApiServerLoader) if doc is not None]


# ------------------------------------------------------------------------------ CRD schemas


@dataclass(frozen=True)
class CrdVersion:
    """One version of a CRD in crds/, with the JSON Schema derived from it."""

    crd: str
    name: str
    served: bool
    deprecation: str | None  # the warning, when the version is deprecated
    schema: dict[str, Any]


def _json_schema(node: Any, in_value_validation: bool = False) -> Any:
    """A structural openAPIV3Schema node as JSON Schema, as strict as the API server."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {k: _json_schema(v, in_value_validation) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _json_schema(value, in_value_validation)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_json_schema(v, in_value_validation=True) for v in value]
        elif key == "not":
            out[key] = _json_schema(value, in_value_validation=True)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource") is True:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        not in_value_validation
        and out.get("type") == "object"
        and "additionalProperties" not in out
        and node.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        out["additionalProperties"] = False
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _document_schema(group: str, version: str, kind: str, openapi: dict[str, Any]) -> dict:
    schema = _json_schema(openapi or {"type": "object"})
    schema.setdefault("type", "object")
    schema["$schema"] = _DIALECT
    schema["properties"] = {
        **schema.get("properties", {}),
        "apiVersion": {"const": f"{group}/{version}"},
        "kind": {"const": kind},
        # The API server checks metadata as ObjectMeta, whatever the CRD says about it.
        "metadata": {
            "$ref": _OBJECT_META,
            "required": ["name"],
            "properties": {"name": {"maxLength": 253, "pattern": _DNS1123_SUBDOMAIN}},
        },
    }
    return schema


@cache
def crd_versions() -> dict[tuple[str, str], dict[str, CrdVersion]]:
    """(group, kind) -> version name -> that version, for every CRD in crds/."""
    found: dict[tuple[str, str], dict[str, CrdVersion]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        # Upstream data, not ours to lint: read with libyaml's loader, which is 10x faster.
        for crd in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_FAST_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for entry in spec["versions"]:
                version = entry["name"]
                openapi = entry.get("schema", {}).get("openAPIV3Schema", {})
                warning = entry.get("deprecationWarning") or f"{group}/{version} is deprecated"
                found.setdefault((group, kind), {})[version] = CrdVersion(
                    crd=crd["metadata"]["name"],
                    name=version,
                    served=entry.get("served") is True,
                    deprecation=warning if entry.get("deprecated") is True else None,
                    schema=_document_schema(group, version, kind, openapi),
                )
    return found


@cache
def _k8s_definitions() -> referencing.Registry:
    """Kubernetes' own definitions (ObjectMeta and what it refers to), as kubernetes-validate
    ships them for K8S_VERSION, strict (no unknown fields)."""
    full = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == K8S_VERSION][-1]
    path = (
        resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{full}-local-strict"
        / "_definitions.json"
    )
    definitions = referencing.Resource.from_contents(json.loads(path.read_text()))
    return definitions @ referencing.Registry()


@cache
def _crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    schema = crd_versions()[(group, kind)][version].schema
    return jsonschema.Draft202012Validator(schema, registry=_k8s_definitions())


# ------------------------------------------------------------------------------ checking


def checked_by(body: dict[str, Any]) -> Literal["crd", "kubernetes-validate"]:
    """Which schema a document goes against: a CRD in crds/ for an API group they define
    (Knative's), kubernetes-validate for every other group."""
    group = str(body.get("apiVersion", "")).rpartition("/")[0]
    return "crd" if any(g == group for g, _ in crd_versions()) else "kubernetes-validate"


def _field(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def _shorten(message: str) -> str:
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 3] + "..."


def _error_fields(error: jsonschema.ValidationError) -> list[tuple[str, str]]:
    """(field, reason) for one schema error; an unknown field is named itself, not its parent."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        declared = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        unknown = [
            key
            for key in error.instance
            if key not in declared and not any(re.search(p, key) for p in patterns)
        ]
        if unknown:
            return [(_field([*path, key]), "unknown field") for key in unknown]
    return [(_field(path), _shorten(error.message))]


def _crd_problems(group: str, version: str, kind: str, body: dict[str, Any]) -> list[tuple]:
    versions = crd_versions().get((group, kind))
    if versions is None:
        kinds = sorted(k for g, k in crd_versions() if g == group)
        return [("kind", f"no CRD for kind {kind} in group {group} (it has {', '.join(kinds)})")]
    served = sorted(v.name for v in versions.values() if v.served)
    entry = versions.get(version)
    if entry is None or not entry.served:
        crd = next(iter(versions.values())).crd
        return [
            ("apiVersion", f"{crd} does not serve {group}/{version} (served: {', '.join(served)})")
        ]
    found: list[tuple] = []
    if entry.deprecation:
        found.append(("apiVersion", f"deprecated: {entry.deprecation}"))
    errors = sorted(
        _crd_validator(group, kind, version).iter_errors(body),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    for error in errors:
        for item in _error_fields(error):
            if item not in found:
                found.append(item)
    return found


def _kubernetes_problems(body: dict[str, Any]) -> list[tuple]:
    try:
        kv_utils.validate(body, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return _error_fields(exc)
    except kv_utils.SchemaNotFoundError as exc:
        return [("kind", f"{exc.message} (nor is there a CRD for it in tests/knative/crds/)")]
    return []


def _resource(body: Any) -> str:
    if not isinstance(body, dict):
        return "?/?"
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"{body.get('kind') or '?'}/{name or '?'}"


def problems(file: str, body: Any) -> list[str]:
    """Why the API server would refuse this document, one line each:
    ``<file>: <Kind>/<name>: <field>: <reason>``. Empty when it would accept it."""
    where = f"{file}: {_resource(body)}"
    if not isinstance(body, dict):
        return [f"{where}: (document): a {type(body).__name__}, not a mapping"]
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if not isinstance(api_version, str) or api_version.count("/") > 1 or not api_version:
        return [f"{where}: apiVersion: missing or malformed ({api_version!r})"]
    if not isinstance(kind, str) or not kind:
        return [f"{where}: kind: missing"]
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return [f"{where}: metadata.name: missing"]
    group, _, version = api_version.rpartition("/")
    if checked_by(body) == "crd":
        found = _crd_problems(group, version, kind, body)
    else:
        found = _kubernetes_problems(body)
    return [f"{where}: {field}: {reason}" for field, reason in found]


def _display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def check_file(path: Path) -> list[str]:
    """:func:`problems` of every document of a YAML file (a YAML error is one problem)."""
    try:
        docs = load_documents(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        return [f"{_display(path)}: invalid YAML: {' '.join(str(exc).split())}"]
    return [line for body in docs for line in problems(_display(path), body)]
