"""docs/events.md and the contract stay one: schemas verbatim, every type documented, and
every emitted type round-trips through both HTTP content modes."""

from __future__ import annotations

import json
import re

import pytest

from handler import contract
from tests.support import REPO

DOC = (REPO / "docs" / "events.md").read_text()


def test_every_schema_is_in_the_doc_verbatim():
    blocks = re.findall(r"\(`handler/schemas/([\w.]+)`\)\n\n```json\n(.*?)\n```", DOC, re.S)
    files = sorted(p.name for p in (REPO / "handler" / "schemas").glob("*.json"))
    assert sorted(name for name, _ in blocks) == files
    for name, text in blocks:
        on_disk = (REPO / "handler" / "schemas" / name).read_text()
        assert json.loads(text) == json.loads(on_disk), name


@pytest.mark.parametrize("event_type", [*contract.CONSUMED_TYPES, *contract.EMITTED_TYPES])
def test_every_event_type_is_documented(event_type):
    assert f"`{event_type}`" in DOC


@pytest.mark.parametrize("event_type", contract.EMITTED_TYPES)
@pytest.mark.parametrize("structured", [False, True], ids=["binary", "structured"])
def test_emitted_events_round_trip(event_type, structured):
    data = {"job_uuid": "rt-1", "status": "completed", "checkpoints": [], "error": None}
    seq = 3 if event_type == contract.JOB_PROGRESS else None
    event = contract.make_event(event_type, "/handler", data, seq=seq, extensions={"team": "a"})
    message = contract.to_http(event, structured=structured)
    back = contract.from_http(message.headers, message.body)
    assert back.get_id() == event.get_id()
    assert back.get_type() == event_type
    assert back.get_subject() == "rt-1"
    assert back.get_extension("team") == "a"
    assert contract.event_data(back) == data


def _mutations(base: dict) -> list[dict]:
    """Valid and invalid variants: wrong types, bools for ints, floats, extra keys, nulls."""
    out = [base]
    for key, value in base.items():
        for bad in (None, True, 1.0, "x", [], {}, 0, -1):
            out.append({**base, key: bad})
        if isinstance(value, dict):
            for inner in value:
                for bad in (None, True, 1.5, "x", 0, [], {"extra": 1}):
                    out.append({**base, key: {**value, inner: bad}})
            out.append({**base, key: {**value, "unexpected": 1}})
    out.append({**base, "unexpected": 1})
    return out


@pytest.mark.parametrize(
    "event_type", [contract.JOB_REQUESTED, contract.JOB_CANCEL_REQUESTED, contract.JOB_COMPLETED]
)
def test_fast_validation_never_accepts_what_jsonschema_rejects(event_type, tmp_path):
    import jsonschema

    from tests.handler.helpers import request_data

    bases = {
        contract.JOB_REQUESTED: request_data("v-1", tmp_path / "d.jsonl"),
        contract.JOB_CANCEL_REQUESTED: {"job_uuid": "v-1"},
        contract.JOB_COMPLETED: {
            "job_uuid": "v-1",
            "status": "completed",
            "progress": {"step": 1, "total_steps": 2, "epoch": 0, "loss": 0.5},
            "checkpoints": [
                {
                    "identifier": "c",
                    "created_at": "t",
                    "epoch": 0,
                    "post_training_job_id": "v-1",
                    "path": "/p",
                }
            ],
            "dataset_rows": 3,
        },
    }
    slow = jsonschema.Draft202012Validator(contract.schema(event_type))
    fast = contract._fast_validator(event_type)
    assert fast is not None
    checked = 0
    for data in _mutations(bases[event_type]):
        try:
            fast(data)
            fast_ok = True
        except ValueError:
            fast_ok = False
        if fast_ok:
            assert slow.is_valid(data), data
        with_reason = slow.is_valid(data)
        if not with_reason:
            with pytest.raises(contract.ContractError):
                contract.validate_data(event_type, data)
        checked += 1
    assert checked >= 10
