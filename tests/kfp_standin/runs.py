"""The stand-in's state: experiments and runs, and the background execution of each run's IR.

A run is executed by ``tests.kfp_standin.executor`` in its own process session, so terminate kills
every task it started. Kubernetes' part is emulated where the pipeline depends on it: the
kfp-kubernetes ``secretAsEnv`` entries of the platform spec inject values from ``secrets`` (the
cluster's Secrets, set by the test) into the named executors' environment, and nothing else from
the test process's credentials reaches a task. Other platform settings (node selector,
tolerations, PVCs, pull secrets) are recorded for inspection, not enforced.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kfp_standin import simulated
from tests.kfp_standin.executor import TASKS_DIR, TASKS_LOG
from tests.kfp_standin.filters import equals_value, parse_filter
from tests.kfp_standin.simulated import Simulation

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
# Never handed to a task from the stand-in's own environment: credentials arrive via Secrets.
_SCRUBBED_PREFIXES = ("AWS_", "KFP_TOKEN", "S3_", "KF_PIPELINES", "OTEL_")


class ApiError(Exception):
    """An error answered to the client: HTTP status plus gRPC code, like grpc-gateway does."""

    GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 501: 12, 503: 14}

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        code = self.GRPC.get(self.status, 2)
        return {"error": self.message, "code": code, "message": self.message, "details": []}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Execution:
    """One run's executor process."""

    process: subprocess.Popen[bytes] | None = None
    cancel_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class KfpState:
    """Experiments, runs and executions; every method is thread-safe."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.multi_user = False  # multi-user KFP: experiments live in a namespace
        self.secrets: dict[str, dict[str, str]] = {}
        # Set: runs are simulated in-process (tests/kfp_standin/simulated.py), not executed.
        self.simulation: Simulation | None = None
        self.task_env: dict[str, str] = {}
        self._lock = threading.RLock()
        self._experiments: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        # display name -> ids of the runs with it, as KFP's database finds a filter on the
        # name without reading every run: a list by name costs the same at 10 runs or 10,000.
        self._named: dict[str, list[str]] = {}
        self._executions: dict[str, Execution] = {}
        self._platform: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []  # run ids DeleteRun removed, oldest first

    # ---- experiments ------------------------------------------------------------------------
    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("display_name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "Invalid input error: experiment display_name is empty")
        namespace = body.get("namespace") or ""
        if self.multi_user and not namespace:
            raise ApiError(
                400, "Invalid input error: multi-user mode needs an experiment namespace"
            )
        with self._lock:
            for exp in self._experiments.values():
                if exp["display_name"] == name and exp["namespace"] == namespace:
                    raise ApiError(
                        409, f"Already exist error: experiment named {name!r} already exists"
                    )
            exp = {
                "experiment_id": str(uuid.uuid4()),
                "display_name": name,
                "description": body.get("description") or "",
                "namespace": namespace,
                "created_at": _now(),
                "storage_state": "AVAILABLE",
                "last_run_created_at": "1970-01-01T00:00:00Z",
            }
            self._experiments[exp["experiment_id"]] = exp
            return dict(exp)

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        with self._lock:
            try:
                return dict(self._experiments[experiment_id])
            except KeyError:
                raise ApiError(404, f"Experiment {experiment_id} not found") from None

    def list_experiments(self, query: dict[str, str]) -> dict[str, Any]:
        keys = frozenset(("display_name", "experiment_id", "namespace", "storage_state"))
        match = parse_filter(query.get("filter"), keys)
        namespace = query.get("namespace") or ""
        if self.multi_user and not namespace:
            raise ApiError(400, "Invalid input error: multi-user mode needs a namespace to list")
        with self._lock:
            items = [
                dict(e)
                for e in self._experiments.values()
                if match(e) and (not namespace or e["namespace"] in ("", namespace))
            ]
        return _page(items, query, "experiments")

    # ---- runs -------------------------------------------------------------------------------
    def create_run(self, body: dict[str, Any], experiment_query: str | None) -> dict[str, Any]:
        name = body.get("display_name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "Invalid input error: run display_name is empty")
        experiment_id = body.get("experiment_id") or experiment_query
        if not experiment_id:
            raise ApiError(400, "Invalid input error: run has no experiment_id")
        experiment = self.get_experiment(experiment_id)
        if body.get("pipeline_version_reference") or body.get("pipeline_version_id"):
            raise ApiError(501, "the KFP stand-in runs inline pipeline_spec only")
        spec, platform = _split_spec(body.get("pipeline_spec"))
        runtime = body.get("runtime_config") or {}
        arguments = dict(runtime.get("parameters") or {})
        _check_arguments(spec, arguments)
        now = _now()
        run = {
            "experiment_id": experiment_id,
            "run_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description") or "",
            "storage_state": "AVAILABLE",
            "pipeline_spec": body.get("pipeline_spec"),
            "runtime_config": {
                "parameters": arguments,
                "pipeline_root": runtime.get("pipeline_root") or "",
            },
            "service_account": body.get("service_account") or "pipeline-runner",
            "created_at": now,
            "scheduled_at": now,
            "finished_at": "1970-01-01T00:00:00Z",
            "state": "PENDING",
            "state_history": [{"update_time": now, "state": "PENDING"}],
        }
        run_dir = self.work_dir / "runs" / run["run_id"]
        run_dir.mkdir(parents=True)
        with self._lock:
            self._runs[run["run_id"]] = run
            self._named.setdefault(name, []).append(run["run_id"])
            self._platform[run["run_id"]] = platform
            experiment_record = self._experiments[experiment["experiment_id"]]
            experiment_record["last_run_created_at"] = now
            execution = self._executions[run["run_id"]] = Execution()
        job = functools.partial(
            self._execute, run["run_id"], spec, platform, arguments, run_dir, execution
        )
        threading.Thread(
            target=_until_done,
            args=(job, execution),
            name=f"kfp-standin-run-{run['run_id'][:8]}",
            daemon=True,
        ).start()
        return self._public(run)

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            try:
                return self._public(self._runs[run_id])
            except KeyError:
                raise ApiError(404, f"Run {run_id} not found") from None

    def list_runs(self, query: dict[str, str]) -> dict[str, Any]:
        keys = frozenset(
            (
                "display_name",
                "run_id",
                "experiment_id",
                "state",
                "storage_state",
                "created_at",
                "finished_at",
            )
        )
        match = parse_filter(query.get("filter"), keys)
        name = equals_value(query.get("filter"), "display_name")
        experiment_id = query.get("experiment_id")
        with self._lock:
            if name is None:
                candidates = list(self._runs.values())
            else:
                candidates = [self._runs[i] for i in self._named.get(name, ())]
            items = [
                self._public(r)
                for r in candidates
                if match(r) and (not experiment_id or r["experiment_id"] == experiment_id)
            ]
        return _page(items, query, "runs")

    def terminate_run(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise ApiError(404, f"Run {run_id} not found")
            if run["state"] in TERMINAL:
                return
            execution = self._executions[run_id]
            execution.cancel_requested = True
            self._set_state(run, "CANCELING")
            process = execution.process
        if process is not None and process.poll() is None:
            _kill_group(process, signal.SIGTERM)

    def delete_run(self, run_id: str) -> None:
        """Terminate the run if it still runs, and forget it (KFP's DeleteRun)."""
        self.terminate_run(run_id)
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self._named[run["display_name"]].remove(run_id)
            self.deleted.append(run_id)

    # ---- test helpers -----------------------------------------------------------------------
    def platform_spec(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._platform[run_id])

    def run_log(self, run_id: str) -> str:
        log = self.work_dir / "runs" / run_id / "log.txt"
        return log.read_text(errors="replace") if log.exists() else ""

    def run_count(self) -> int:
        with self._lock:
            return len(self._runs)

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no execution is running."""
        with self._lock:
            executions = list(self._executions.values())
        deadline = datetime.now(UTC).timestamp() + timeout
        for execution in executions:
            left = deadline - datetime.now(UTC).timestamp()
            if left <= 0 or not execution.done.wait(left):
                return False
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Kill every running execution (bounded), like deleting the cluster."""
        with self._lock:
            executions = list(self._executions.values())
        for execution in executions:
            process = execution.process
            if process is not None and process.poll() is None:
                execution.cancel_requested = True
                _kill_group(process, signal.SIGKILL)
        for execution in executions:
            execution.done.wait(timeout)

    # ---- internals --------------------------------------------------------------------------
    def _simulate(
        self,
        run_id: str,
        spec: dict[str, Any],
        arguments: dict[str, Any],
        secret_env: dict[str, dict[str, str]],
        execution: Execution,
    ) -> None:
        """Run the pipeline's effects in-process (tests/kfp_standin/simulated.py)."""
        assert self.simulation is not None and self.simulation.train_s is not None
        with self._lock:
            run = self._starting(run_id, execution)
            if run is None:
                return
            self._set_state(run, "RUNNING")
        env = {**self.task_env, **_task_env(spec, "exec-train"), **secret_env.get("exec-train", {})}
        if "job_uuid" not in arguments or "request_json" not in arguments:
            time.sleep(self.simulation.train_s)  # not the project's pipeline: nothing to do
            with self._lock:
                self._set_state(run, "CANCELED" if execution.cancel_requested else "SUCCEEDED")
            return
        try:
            error = simulated.train(
                run_id, arguments, env, self.simulation, lambda: execution.cancel_requested
            )
        except Exception as exc:  # as a crashing task would
            error = f"{type(exc).__name__}: {exc}"
        if execution.cancel_requested:
            with self._lock:
                self._set_state(run, "CANCELED")
            return
        simulated.notify(run_id, arguments, "FAILED" if error else "SUCCEEDED", error)
        with self._lock:
            self._set_state(
                run,
                "CANCELED" if execution.cancel_requested else "FAILED" if error else "SUCCEEDED",
            )

    def _public(self, run: dict[str, Any]) -> dict[str, Any]:
        # A copy, but the pipeline spec is shared: nothing changes it after creation, and at
        # ~14 kB copying it was most of what answering a run cost.
        public = {k: v if k == "pipeline_spec" else copy.deepcopy(v) for k, v in run.items()}
        details = _task_details(run["run_id"], self.work_dir / "runs" / run["run_id"])
        if details:
            public["run_details"] = {"task_details": details}
        return public

    def oom_kill(self, run_id: str, executor: str = "exec-train", timeout: float = 60) -> None:
        """Kill a running task's process as the kernel's OOM killer does (SIGKILL), so it is
        reported as Kubernetes reports it: ``OOMKilled (exit code 137)``."""
        run_dir = self.work_dir / "runs" / run_id
        deadline = time.monotonic() + timeout
        while (pid := _running_pid(run_dir, executor)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no running {executor} task in run {run_id}")
            time.sleep(0.1)
        (run_dir / TASKS_DIR / f"{executor}.oom").touch()
        for victim in [pid, *_descendants(pid)]:  # the container's processes, all at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def _starting(self, run_id: str, execution: Execution) -> dict[str, Any] | None:
        """The run whose execution starts now (the lock held), or None: deleted meanwhile
        (DeleteRun: nothing runs), or cancelled before it started (then marked CANCELED)."""
        run = self._runs.get(run_id)
        if run is not None and execution.cancel_requested:
            self._set_state(run, "CANCELED")
            return None
        return run

    def _set_state(self, run: dict[str, Any], state: str, error: str | None = None) -> None:
        now = _now()
        run["state"] = state
        entry: dict[str, Any] = {"update_time": now, "state": state}
        if error:
            run["error"] = {"code": 2, "message": error, "details": []}
            entry["error"] = run["error"]
        run["state_history"].append(entry)
        if state in TERMINAL:
            run["finished_at"] = now

    def _execute(
        self,
        run_id: str,
        spec: dict[str, Any],
        platform: dict[str, Any],
        arguments: dict[str, Any],
        run_dir: Path,
        execution: Execution,
    ) -> None:
        try:
            secret_env = _secret_env(spec, platform, arguments, self.secrets)
        except ApiError as exc:  # like a pod stuck on a missing Secret: the run fails
            with self._lock:
                if (run := self._runs.get(run_id)) is not None:
                    self._set_state(run, "FAILED", exc.message)
            return
        if self.simulation is not None:
            if self.simulation.train_s is not None:
                self._simulate(run_id, spec, arguments, secret_env, execution)
            return
        (run_dir / "pipeline_spec.json").write_text(json.dumps(spec))
        # Read and deleted by the executor: secret values never sit in the run's files.
        secret_file = run_dir / "secret_env.json"
        secret_file.touch(mode=0o600)
        secret_file.write_text(json.dumps(secret_env))
        (run_dir / "arguments.json").write_text(json.dumps(arguments))
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(self.task_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with self._lock:
            run = self._starting(run_id, execution)
            if run is None:
                return
            with open(run_dir / "log.txt", "wb") as log:
                execution.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.kfp_standin.executor",
                        "--run-dir",
                        str(run_dir),
                        "--run-id",
                        run_id,
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._set_state(run, "RUNNING")
        process = execution.process
        code = _wait(process, execution)
        _kill_group(process, signal.SIGKILL)  # tasks may outlive their executor: none may linger
        with self._lock:
            if execution.cancel_requested:
                self._set_state(run, "CANCELED")
            elif code == 0:
                self._set_state(run, "SUCCEEDED")
            else:
                error_file = run_dir / "error.txt"
                message = (
                    error_file.read_text() if error_file.exists() else f"executor exited {code}"
                )
                self._set_state(run, "FAILED", message)


def _task_entries(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / TASKS_LOG).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a task is ``sh -c`` running python, as in its container)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return found


def _running_pid(run_dir: Path, executor: str) -> int | None:
    pid = None
    for entry in _task_entries(run_dir):
        if entry["executor"] == executor:
            pid = entry.get("pid") if entry["event"] == "started" else None
    return pid


def _task_details(run_id: str, run_dir: Path) -> list[dict[str, Any]]:
    """``run_details.task_details`` as KFP answers it: each task's state and, for a failed one,
    the error Kubernetes reported (its termination message, ``OOMKilled (exit code 137)``, or
    ``Error (exit code N)``)."""
    tasks: dict[str, dict[str, Any]] = {}
    for entry in _task_entries(run_dir):
        name = entry["executor"]
        if entry["event"] == "started":
            tasks[name] = {
                "run_id": run_id,
                "task_id": f"{run_id}-{name}",
                "display_name": name.removeprefix("exec-"),
                "pod_name": f"{run_id[:8]}-{name}",
                "create_time": entry["time"],
                "start_time": entry["time"],
                "state": "RUNNING",
            }
            continue
        task = tasks.setdefault(name, {"display_name": name.removeprefix("exec-")})
        task["end_time"] = entry["time"]
        code = entry["returncode"]
        if code == 0:
            task["state"] = "SUCCEEDED"
            continue
        task["state"] = "FAILED"
        exit_code = 128 - code if code < 0 else code
        message_file = run_dir / TASKS_DIR / f"{name}.termination-log"
        if entry.get("oom"):
            message = f"OOMKilled (exit code {exit_code})"
        elif message_file.exists() and message_file.read_text().strip():
            message = message_file.read_text().strip()
        else:
            message = f"Error (exit code {exit_code})"
        task["error"] = {"code": 2, "message": message, "details": []}
    return list(tasks.values())


def _task_env(spec: dict[str, Any], executor: str) -> dict[str, str]:
    container = spec.get("deploymentSpec", {}).get("executors", {}).get(executor, {})
    return {e["name"]: e["value"] for e in container.get("container", {}).get("env", [])}


def _until_done(job: Callable[[], None], execution: Execution) -> None:
    """Run ``job``; however it ends, the execution counts as done."""
    try:
        job()
    finally:
        execution.done.set()


def _wait(process: subprocess.Popen[bytes], execution: Execution, grace: float = 10.0) -> int:
    """Wait for the executor; once cancelled, give it ``grace`` seconds before SIGKILL."""
    cancelled_at: float | None = None
    while True:
        try:
            return process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if execution.cancel_requested:
            now = time.monotonic()
            cancelled_at = cancelled_at or now
            if now - cancelled_at > grace:
                _kill_group(process, signal.SIGKILL)


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _page(items: list[dict[str, Any]], query: dict[str, str], name: str) -> dict[str, Any]:
    sort_by = (query.get("sort_by") or "created_at").split()
    reverse = len(sort_by) > 1 and sort_by[1].lower() == "desc"
    items.sort(key=lambda item: str(item.get(sort_by[0], "")), reverse=reverse)
    try:
        size = int(query.get("page_size") or 0) or len(items) or 1
        start = int(query.get("page_token") or 0)
    except ValueError:
        raise ApiError(
            400, "Invalid input error: page_size and page_token must be integers"
        ) from None
    page = items[start : start + size]
    out: dict[str, Any] = {"total_size": len(items)}
    if page:
        out[name] = page
    if start + size < len(items):
        out["next_page_token"] = str(start + size)
    return out


def _split_spec(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's ``pipeline_spec``: the IR, or {pipeline_spec, platform_spec} with kfp-kubernetes."""
    if not isinstance(value, dict) or not value:
        raise ApiError(400, "Invalid input error: run has no pipeline_spec")
    if "pipeline_spec" in value:
        return value["pipeline_spec"], value.get("platform_spec") or {}
    return value, {}


@functools.lru_cache(maxsize=64)
def _spec_problem(spec_json: str) -> str | None:
    """Why the spec (canonical JSON) is not a ``PipelineSpec``, or None. Remembered per spec:
    protobuf's pure-Python JSON parser took ~2 ms for the project's, where the real server's
    Go one takes a fraction of that, and most runs carry the same spec."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    try:
        json_format.ParseDict(json.loads(spec_json), pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as exc:
        return str(exc)
    return None


def _check_arguments(spec: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Reject what the real server's run creation rejects: unknown or missing parameters."""
    problem = _spec_problem(json.dumps(spec, sort_keys=True))
    if problem:
        raise ApiError(400, f"Invalid input error: pipeline_spec is not a PipelineSpec: {problem}")
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(arguments) - set(declared))
    if unknown:
        raise ApiError(400, f"Invalid input error: unknown pipeline parameters {unknown}")
    missing = sorted(
        name
        for name, definition in declared.items()
        if name not in arguments
        and "defaultValue" not in definition
        and not definition.get("isOptional")
    )
    if missing:
        raise ApiError(400, f"Invalid input error: missing pipeline parameters {missing}")


def _secret_env(
    spec: dict[str, Any],
    platform: dict[str, Any],
    arguments: dict[str, Any],
    secrets: dict[str, dict[str, str]],
) -> dict[str, dict[str, str]]:
    """The env each executor's ``secretAsEnv`` entries ask for, resolved as the kubelet would."""
    k8s = platform.get("platforms", {}).get("kubernetes", {})
    executors_cfg = k8s.get("deploymentSpec", {}).get("executors", {})
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    out: dict[str, dict[str, str]] = {}
    for executor_name, cfg in executors_cfg.items():
        if executor_name not in executors:
            continue
        for entry in cfg.get("secretAsEnv", []):
            secret_name = _secret_name(entry, arguments)
            secret = secrets.get(secret_name)
            if secret is None:
                if entry.get("optional"):
                    continue
                raise ApiError(400, f"secret {secret_name!r} not found for {executor_name}")
            for mapping in entry.get("keyToEnv", []):
                key = mapping.get("secretKey")
                if key not in secret:
                    if entry.get("optional"):
                        continue
                    raise ApiError(400, f"secret {secret_name!r} has no key {key!r}")
                out.setdefault(executor_name, {})[mapping.get("envVar")] = secret[key]
    return out


def _secret_name(entry: dict[str, Any], arguments: dict[str, Any]) -> str:
    param = entry.get("secretNameParameter") or {}
    runtime = param.get("runtimeValue") or {}
    if "constant" in runtime:
        return str(runtime["constant"])
    if "componentInputParameter" in param:
        return str(arguments.get(param["componentInputParameter"], ""))
    return str(entry.get("secretName", ""))
