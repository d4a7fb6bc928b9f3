"""Runs one submitted pipeline IR with kfp.local, in its own process (``python -m``).

The stand-in starts this in a new session per run, so terminating a run kills the whole process
group (this process and every task subprocess kfp.local started), as deleting a run's pods would.
Each task process is recorded (pid, exit code) in ``tasks.jsonl`` and has its own termination
message file, so the stand-in reports per-task outcomes as KFP's ``run_details`` does.
Exit status: 0 the pipeline succeeded, 1 it failed (kfp.local raised), 2 the IR could not run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import types
from datetime import UTC, datetime
from pathlib import Path

from pipelines.termination import PATH_ENV as TERMINATION_ENV

TASKS_DIR = "tasks"
TASKS_LOG = "tasks.jsonl"  # one line per task start and end, read by the stand-in's get_run
EXECUTOR_ENV = "KFP_STANDIN_EXECUTOR"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kfp_standin.executor")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--run-id", default="", help="what {{$.pipeline_job_uuid}} resolves to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

    from google.protobuf import json_format
    from kfp import local
    from kfp.local import pipeline_orchestrator
    from kfp.pipeline_spec import pipeline_spec_pb2

    run_dir: Path = args.run_dir
    try:
        spec_dict = json.loads((run_dir / "pipeline_spec.json").read_text())
        arguments = json.loads((run_dir / "arguments.json").read_text())
        secret_file = run_dir / "secret_env.json"
        secret_env = json.loads(secret_file.read_text()) if secret_file.exists() else {}
        secret_file.unlink(missing_ok=True)
        _add_env(spec_dict, secret_env)
        _add_env(spec_dict, task_files_env(spec_dict, run_dir))
        spec = json_format.ParseDict(spec_dict, pipeline_spec_pb2.PipelineSpec())
    except (OSError, ValueError, json_format.ParseError) as exc:
        print(f"kfp-standin: cannot load the run's IR: {exc}", flush=True)
        return 2
    if args.run_id:
        # On a KFP server PIPELINE_JOB_ID_PLACEHOLDER is the run's id; kfp.local draws a random
        # one in exactly this spot, so hand it the run id instead.
        pipeline_orchestrator.placeholder_utils = types.SimpleNamespace(
            make_random_id=lambda: args.run_id
        )
    from kfp.local import subprocess_task_handler

    # Like the kubelet, know each task's process: its pid (an OOM kill needs it) and exit code.
    subprocess_task_handler.run_local_subprocess = functools.partial(run_task, run_dir)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_dir / "pipeline_root"),
        raise_on_error=True,
    )
    try:
        pipeline_orchestrator.run_local_pipeline(pipeline_spec=spec, arguments=arguments)
    except Exception as exc:  # kfp.local raises RuntimeError naming the failed task
        print(f"kfp-standin: pipeline failed: {exc}", flush=True)
        (run_dir / "error.txt").write_text(str(exc))
        return 1
    return 0


def task_files_env(spec: dict, run_dir: Path) -> dict[str, dict[str, str]]:
    """Per executor: its name, and its own termination message file (the kubelet mounts one
    per container at /dev/termination-log)."""
    tasks = run_dir / TASKS_DIR
    tasks.mkdir(exist_ok=True)
    return {
        name: {EXECUTOR_ENV: name, TERMINATION_ENV: str(tasks / f"{name}.termination-log")}
        for name in spec.get("deploymentSpec", {}).get("executors", {})
    }


def run_task(run_dir: Path, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's ``run_local_subprocess``, recording the task's pid and how it ended."""
    env = {**os.environ, **(env_vars or {})}
    executor = env.get(EXECUTOR_ENV, "")
    with subprocess.Popen(
        full_command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
    ) as process:
        _record(run_dir, {"executor": executor, "event": "started", "pid": process.pid})
        for line in iter(process.stdout.readline, ""):  # type: ignore[union-attr]
            print(line, end="", flush=True)
        code = process.wait()
    oom = (run_dir / TASKS_DIR / f"{executor}.oom").exists()
    _record(run_dir, {"executor": executor, "event": "ended", "returncode": code, "oom": oom})
    return code


def _record(run_dir: Path, entry: dict) -> None:
    entry["time"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with (run_dir / TASKS_LOG).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _add_env(spec: dict, env_by_executor: dict[str, dict[str, str]]) -> None:
    """Put Secret-derived env on each executor's container, as the kubelet does for a pod."""
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    for name, env in env_by_executor.items():
        container = executors.get(name, {}).get("container")
        if container is not None:
            container.setdefault("env", []).extend(
                {"name": key, "value": value} for key, value in env.items()
            )


if __name__ == "__main__":
    sys.exit(main())
