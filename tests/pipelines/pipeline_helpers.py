"""Shared helpers for the pipeline tests: datasets, requests, archives and the `run` command."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from pipelines.sa_token import POD_NAMESPACE_ENV, POD_SERVICE_ACCOUNT_ENV
from tests.k8s_standin import KubeApiStandin
from tests.support import REPO
from tests.support.jobs import lora

RUN_TIMEOUT_S = 300


def write_rows(path: Path, n: int, data_format: str = "instruct", offset: int = 0) -> Path:
    """``n`` llama-stack rows (arithmetic Q&A) in ``data_format``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            q, a = f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."
            if data_format == "instruct":
                row = {
                    "chat_completion_input": json.dumps([{"role": "user", "content": q}]),
                    "expected_answer": a,
                }
            else:
                row = {
                    "dialog": json.dumps(
                        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                    )
                }
            f.write(json.dumps(row) + "\n")
    return path


BASE_REQUEST: dict[str, Any] = {
    "model": "llama3.2-tiny",
    "training_config": {
        "n_epochs": 2,
        "max_steps_per_epoch": 3,
        "gradient_accumulation_steps": 2,
        "max_validation_steps": 2,
        "data_config": {
            "dataset_id": "arith",
            "batch_size": 4,
            "shuffle": True,
            "data_format": "instruct",
            "train_on_input": False,
        },
        "optimizer_config": {
            "optimizer_type": "adamw",
            "lr": 0.003,
            "weight_decay": 0.01,
            "num_warmup_steps": 1,
        },
        "efficiency_config": {"enable_activation_checkpointing": False},
        "dtype": "bf16",
    },
    "algorithm_config": lora(),
}


def make_request(job_uuid: str, model_uri: str, dataset_uri: str, **overrides: Any) -> dict:
    """A complete job request; ``overrides`` replace top-level fields."""
    request = copy.deepcopy(BASE_REQUEST)
    request.update(
        job_uuid=job_uuid, model_artifact={"uri": model_uri}, dataset={"uri": dataset_uri}
    )
    request.update(overrides)
    return request


def run_cli(
    request: dict[str, Any] | None,
    tmp: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    request_path: Path | None = None,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``python -m pipelines run`` on ``request``; returns (process, --out path)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if request_path is None:
        request_path = tmp / "request.json"
        request_path.write_text(json.dumps(request))
    out = tmp / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "--request",
        str(request_path),
        "--out",
        str(out),
        "--workdir",
        str(tmp / "work"),
        *extra,
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return proc, out


def make_tar(src: Path, out: Path, *, gzip: bool, arcname: str = "llama3.2-tiny") -> Path:
    """Pack a model directory under one top-level dir, the way people tar checkpoints."""
    with tarfile.open(out, "w:gz" if gzip else "w") as tar:
        tar.add(src, arcname=arcname)
    return out


# The pipeline pods' service account (a DSPA's runner), as the pipeline tests' pods run it.
RUNNER = ("kfp-trainer", "pipeline-runner-dspa")


def pod_env(api: KubeApiStandin, sa_dir: Path) -> dict[str, str]:
    """What a pipeline pod has: the API address, its service-account files, the downward API."""
    sa_dir.mkdir(parents=True, exist_ok=True)
    (sa_dir / "token").write_text(api.service_account_token(*RUNNER))
    (sa_dir / "ca.crt").write_bytes(api.ca_file.read_bytes())
    host, port = api.url.removeprefix("https://").split(":")
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KFP_TRAINER_SA_DIR": str(sa_dir),
        POD_NAMESPACE_ENV: RUNNER[0],
        POD_SERVICE_ACCOUNT_ENV: RUNNER[1],
    }


def task_events_config(url: str, job_uuid: str, **kwargs: Any) -> Any:
    """The train task's TaskEventsConfig as the handler makes it, posting to ``url``."""
    from handler import contract
    from pipelines.task_events import TaskEventsConfig

    return TaskEventsConfig(
        url=url,
        source="/kfp-trainer/handler",
        started_type=contract.JOB_STARTED,
        started_id=contract.event_id(job_uuid, contract.JOB_STARTED),
        progress_type=contract.JOB_PROGRESS,
        progress_id_prefix=contract.event_id(job_uuid, contract.JOB_PROGRESS) + "/",
        **kwargs,
    )
