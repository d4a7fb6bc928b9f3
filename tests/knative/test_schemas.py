"""tests/knative/schemas.py fails what the API server would refuse, and says where.

Each broken manifest is a real document of knative/ with one thing wrong, written to a file;
the problem names that file, the resource and the field.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.knative import manifests as m
from tests.knative import schemas


def _set(body: dict[str, Any], field: str, value: Any) -> None:
    """body[field] = value, for a dotted field with [i] list indexes (parents must exist)."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", field)]
    target = body
    for part in parts[:-1]:
        target = target[part]
    target[parts[-1]] = value


def _broken(tmp_path: Path, kind: str, field: str, value: Any) -> tuple[Path, m.Doc]:
    """The first knative/ document of `kind`, with `field` set to `value`, in a file."""
    doc = m.find(kind)[0]
    body = copy.deepcopy(doc.body)
    _set(body, field, value)
    path = tmp_path / f"broken-{doc.file}"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path, doc


def _the_problem(path: Path) -> str:
    problems = schemas.check_file(path)
    assert len(problems) == 1, problems
    return problems[0]


def _assert_names(problem: str, path: Path, resource: str, field: str, reason: str) -> None:
    where = f"{path}: {resource}: {field}: "
    assert problem.startswith(where), f"{problem!r} does not start with {where!r}"
    assert re.search(reason, problem[len(where) :]), problem


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("Service", "spec.template.spec.containerConcurency"),
        ("Service", "spec.template.spec.containers[0].imagePullPolicyy"),
        ("Trigger", "spec.subscriber.ref.nmae"),
        ("Broker", "metadata.labelz"),  # ObjectMeta is strict too
    ],
)
def test_an_unknown_field_fails(tmp_path, kind, field):
    path, doc = _broken(tmp_path, kind, field, 3)
    _assert_names(_the_problem(path), path, f"{kind}/{doc.name}", field, r"^unknown field$")


@pytest.mark.parametrize(
    ("kind", "field", "value", "reason"),
    [
        ("Service", "spec.template.spec.containerConcurrency", "eight", "not of type 'integer'"),
        ("Service", "spec.template.spec.containers[0].env", {"A": "b"}, "not of type 'array'"),
        ("PingSource", "spec.schedule", 5, "not of type 'string'"),
        ("Broker", "spec.delivery.retry", "three", "not of type 'integer'"),
        ("Trigger", "metadata.name", "Not_A_DNS_Name", "does not match"),
    ],
)
def test_a_wrong_type_or_value_fails(tmp_path, kind, field, value, reason):
    path, doc = _broken(tmp_path, kind, field, value)
    name = value if field == "metadata.name" else doc.name
    _assert_names(_the_problem(path), path, f"{kind}/{name}", field, reason)


@pytest.mark.parametrize(
    ("kind", "field", "value", "reason"),
    [
        ("Service", "apiVersion", "serving.knative.dev/v1beta1", r"does not serve .*served: v1\)"),
        ("Trigger", "apiVersion", "eventing.knative.dev/v2", "does not serve"),
        ("Trigger", "kind", "Triger", "no CRD for kind Triger in group eventing.knative.dev"),
        ("PingSource", "apiVersion", "sources.knative.dev/v1beta2", "^deprecated: "),
    ],
)
def test_a_kind_or_version_the_crds_do_not_serve_fails(tmp_path, kind, field, value, reason):
    path, doc = _broken(tmp_path, kind, field, value)
    resource = f"{value if field == 'kind' else kind}/{doc.name}"
    _assert_names(_the_problem(path), path, resource, field, reason)


def test_a_version_the_crd_declares_unserved_fails(tmp_path, monkeypatch):
    versions = schemas.crd_versions()[("sources.knative.dev", "PingSource")]
    monkeypatch.setitem(versions, "v1", dataclasses.replace(versions["v1"], served=False))
    path, doc = _broken(tmp_path, "PingSource", "metadata.name", m.find("PingSource")[0].name)
    _assert_names(
        _the_problem(path), path, f"PingSource/{doc.name}", "apiVersion", "does not serve"
    )


@pytest.mark.parametrize(
    ("kind", "field", "value", "reason"),
    [
        ("Role", "rules[0].verb", ["get"], "^unknown field$"),
        ("ConfigMap", "data.KFP_TRAINER_MODE", 8, "not of type 'string', 'null'"),
        ("ServiceAccount", "automountServiceAccountToken", "no", "not of type 'boolean'"),
        ("Role", "kind", "Rolle", "Couldn't find schema for kind Rolle"),
    ],
)
def test_a_core_kind_kubernetes_validate_refuses_fails(tmp_path, kind, field, value, reason):
    path, doc = _broken(tmp_path, kind, field, value)
    assert schemas.checked_by(doc.body) == "kubernetes-validate"
    resource = f"{value if field == 'kind' else kind}/{doc.name}"
    _assert_names(_the_problem(path), path, resource, field, reason)


def test_a_duplicate_key_fails_naming_the_file(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, name: b}\n")
    (problem,) = schemas.check_file(path)
    assert problem.startswith(f"{path}: invalid YAML:") and "duplicate key 'name'" in problem


def test_what_the_crds_leave_open_stays_open():
    """Not stricter than the API server: preserved fields, int-or-string and nullable pass."""
    trigger = copy.deepcopy(m.find("Trigger")[0].body)
    trigger["spec"]["filter"] = {"attributes": {"type": "t", "source": "anything"}}
    trigger["spec"]["delivery"]["timeout"] = "PT5S"  # delivery preserves unknown fields
    service = copy.deepcopy(m.handler_service().body)
    probe = service["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    for port in (8080, "http1"):
        probe["httpGet"]["port"] = port
        assert schemas.problems("x.yaml", service) == []
    assert schemas.problems("x.yaml", trigger) == []


def test_every_derived_schema_is_valid_json_schema():
    versions = [v for by_version in schemas.crd_versions().values() for v in by_version.values()]
    assert {v.crd for v in versions} >= {
        "services.serving.knative.dev",
        "brokers.eventing.knative.dev",
        "triggers.eventing.knative.dev",
        "sinkbindings.sources.knative.dev",
        "pingsources.sources.knative.dev",
    }
    for version in versions:
        jsonschema.Draft202012Validator.check_schema(version.schema)


def _git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_the_crds_are_the_upstream_files_sources_md_names():
    sources = (schemas.CRD_DIR / "SOURCES.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| (\S+\.yaml) \|.*\| ([0-9a-f]{40}) \|$", sources, re.M))
    on_disk = {p.name: _git_blob(p) for p in schemas.CRD_DIR.glob("*.yaml")}
    assert on_disk == listed, "a CRD copy differs from its upstream blob, or is not listed"
    assert "Apache License 2.0" in sources
