"""KFP runs as plain values, parsed straight from the API's JSON.

The generated ``kfp_server_api`` models build a ``Configuration`` (logging set-up, CPU count)
for every object they deserialize, which made reading one run cost milliseconds; the handler
reads runs on every request, so it asks for the raw JSON (``_preload_content=False``) and keeps
only the fields it uses, under the API's own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Status:
    """``googleRpcStatus``: a code and a message."""

    code: int = 0
    message: str = ""

    @classmethod
    def parse(cls, value: Any) -> Status | None:
        if not isinstance(value, dict) or not (value.get("message") or value.get("code")):
            return None
        return cls(int(value.get("code") or 0), str(value.get("message") or ""))


@dataclass(frozen=True)
class StateEntry:
    """One entry of a run's or task's ``state_history``."""

    state: str | None
    update_time: str | None


@dataclass(frozen=True)
class TaskDetail:
    """One task of ``run_details.task_details``."""

    display_name: str | None
    state: str | None
    error: Status | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunDetails:
    task_details: list[TaskDetail] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """A KFP v2beta1 run, as much of it as remote mode reads."""

    run_id: str
    display_name: str | None
    state: str | None
    created_at: str | None = None
    finished_at: str | None = None
    state_history: list[StateEntry] = field(default_factory=list)
    runtime_config: RuntimeConfig = field(default_factory=RuntimeConfig)
    run_details: RunDetails = field(default_factory=RunDetails)
    error: Status | None = None

    @classmethod
    def parse(cls, value: dict[str, Any]) -> Run:
        details = value.get("run_details") or {}
        return cls(
            run_id=str(value.get("run_id") or ""),
            display_name=value.get("display_name"),
            state=value.get("state"),
            created_at=value.get("created_at"),
            finished_at=value.get("finished_at"),
            state_history=[
                StateEntry(e.get("state"), e.get("update_time"))
                for e in value.get("state_history") or []
            ],
            runtime_config=RuntimeConfig(
                dict((value.get("runtime_config") or {}).get("parameters") or {})
            ),
            run_details=RunDetails(
                [
                    TaskDetail(t.get("display_name"), t.get("state"), Status.parse(t.get("error")))
                    for t in details.get("task_details") or []
                ]
            ),
            error=Status.parse(value.get("error")),
        )


__all__ = ["Run", "RunDetails", "RuntimeConfig", "StateEntry", "Status", "TaskDetail"]
