"""Local mode: each job is a ``python -m pipelines run`` process on this machine.

The process runs the KFP pipeline through SubprocessRunner and writes a progress file while it
trains and a result file when it ends. It starts in its own session, so it outlives the handler
worker that started it (a gunicorn worker recycle or a handler restart does not kill training)
and ``os.killpg`` stops it together with the KFP task processes under it. Everything needed to
find it again (pid, process identity, whether a cancel was asked for) lives in the job store,
so any worker can answer ``status()`` and ``cancel()`` for any job, and a restarted handler
picks up where the last one left off: a process still running is watched, one that finished
left its result file, one that died without a result is reported failed, naming why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from handler import logs, procs
from handler.backends.base import Backend, BackendRejected, RunState
from handler.contract import JobStatus
from handler.settings import HandlerSettings
from handler.store import JobStore

log = logs.get("handler.backends.local")

KILL_AFTER_S: Final = 10.0  # SIGTERM first; SIGKILL the group if it is still there after this
_LOG_TAIL_BYTES: Final = 2000


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"the training process was killed by signal {name}"
    return f"the training process exited with code {returncode}"


class LocalBackend(Backend):
    """Runs jobs as local processes; at most ``settings.local_workers`` at once (FIFO)."""

    name = "local"
    poll_interval_s: float | None = 0.5

    def __init__(
        self,
        settings: HandlerSettings,
        store: JobStore,
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        """:param command: the argv prefix to run (default ``python -m pipelines run``)."""
        self.settings = settings
        self.store = store
        self.max_concurrent: int | None = settings.local_workers
        self.command = list(command) if command else [sys.executable, "-m", "pipelines", "run"]
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # -- files ---------------------------------------------------------------------------------

    def job_dir(self, job_uuid: str) -> Path:
        return self.settings.state_dir / "jobs" / job_uuid

    def _files(self, job_uuid: str) -> dict[str, Path]:
        d = self.job_dir(job_uuid)
        return {
            "request": d / "request.json",
            "result": d / "result.json",
            "progress": d / "progress.json",
            "log": d / "run.log",
            "workdir": d / "work",
        }

    # -- Backend -------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> str:
        job_uuid = request["job_uuid"]
        files = self._files(job_uuid)
        state = self.store.backend_state(job_uuid)
        if state.get("token") and (procs.alive(state["token"]) or files["result"].exists()):
            return state["run_id"]  # already started (a retried submit after a crash)
        try:
            files["workdir"].mkdir(parents=True, exist_ok=True)
            for stale in (files["result"], files["progress"]):
                stale.unlink(missing_ok=True)
            tmp = files["request"].with_suffix(".json.tmp")
            tmp.write_text(json.dumps(request, indent=2), encoding="utf-8")
            os.replace(tmp, files["request"])
        except OSError as exc:
            raise BackendRejected(
                f"cannot prepare the job directory {self.job_dir(job_uuid)}: {exc}"
            ) from exc
        argv = [
            *self.command,
            "--request",
            str(files["request"]),
            "--out",
            str(files["result"]),
            "--progress",
            str(files["progress"]),
            "--workdir",
            str(files["workdir"]),
        ]
        try:
            with files["log"].open("ab") as log_file:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    # stdout is the command's answer, also in --out; stderr is its JSON log.
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    cwd=files["workdir"],
                    start_new_session=True,
                )
        except OSError as exc:
            raise BackendRejected(f"cannot start the training process: {exc}") from exc
        run_id = f"local-{proc.pid}"
        with self._lock:
            self._children[job_uuid] = proc
        self.store.set_backend_state(
            job_uuid,
            {
                "pid": proc.pid,
                "token": procs.token(proc.pid),
                "run_id": run_id,
                "cancelled_at": None,
                "started_at": time.time(),
            },
        )
        log.info(
            "training process started",
            extra={"job_uuid": job_uuid, "pid": proc.pid, "log": str(files["log"])},
        )
        return run_id

    def status(self, job_uuid: str, run_id: str | None) -> RunState:
        state = self.store.backend_state(job_uuid)
        if not state.get("token"):
            return RunState(JobStatus.scheduled, run_id)
        run_id = state.get("run_id", run_id)
        files = self._files(job_uuid)
        started = datetime.fromtimestamp(state.get("started_at") or time.time(), UTC)
        with self._lock:
            proc = self._children.get(job_uuid)
        returncode = proc.poll() if proc is not None else None
        running = returncode is None if proc is not None else procs.alive(state["token"])
        progress = _read_json(files["progress"])
        if running:
            self._escalate(state)
            return RunState(JobStatus.in_progress, run_id, started_at=started, progress=progress)
        if proc is not None:
            with self._lock:
                self._children.pop(job_uuid, None)
        result = _read_json(files["result"])
        ended = _mtime(files["result"]) or datetime.now(UTC)
        common: dict[str, Any] = {
            "run_id": run_id,
            "started_at": started,
            "completed_at": ended,
            "progress": progress,
        }
        finished = result is not None and result.get("status") == "completed"
        if state.get("cancelled_at") and not finished:  # a cancel that came too late loses
            return RunState(JobStatus.cancelled, result=result or {}, error=None, **common)
        if result is not None and result.get("status") in ("completed", "failed", "cancelled"):
            status = JobStatus(result["status"])
            return RunState(status, result=result, error=result.get("error"), **common)
        if returncode is not None:
            reason = _exit_reason(returncode)
        else:
            reason = (
                f"the training process (pid {state.get('pid')}) is gone: it ended while no "
                "handler was watching it (for example during a handler restart)"
            )
        tail = _tail(files["log"])
        error = f"{reason} and wrote no result" + (f"; last output: {tail}" if tail else "")
        return RunState(JobStatus.failed, error=error, **common)

    def _escalate(self, state: dict[str, Any]) -> None:
        cancelled_at = state.get("cancelled_at")
        if cancelled_at and time.time() - cancelled_at > KILL_AFTER_S:
            self._signal(state, signal.SIGKILL)

    def _signal(self, state: dict[str, Any], sig: signal.Signals) -> None:
        pid = state.get("pid")
        if not pid or not procs.alive(state.get("token", "")):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("cannot signal training process", extra={"pid": pid, "problem": str(exc)})

    def cancel(self, job_uuid: str, run_id: str | None) -> None:
        state = self.store.backend_state(job_uuid)
        if not state.get("cancelled_at"):
            state["cancelled_at"] = time.time()
            self.store.set_backend_state(job_uuid, {"cancelled_at": state["cancelled_at"]})
        self._signal(state, signal.SIGTERM)
        log.info("training process asked to stop", extra={"job_uuid": job_uuid})

    def ready(self) -> bool:
        try:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.settings.state_dir, os.W_OK)
