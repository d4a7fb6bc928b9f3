"""What a training job is made of in tests: the request body, its parts, a dataset, the model.

One shape for every folder (handler, knative, provider, pipelines, remote); a folder changes
only what it tests through the keyword arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO

MODEL = "llama3.2-tiny"


def lora(**overrides: Any) -> dict[str, Any]:
    """A LoRA ``algorithm_config`` small enough for the tiny model."""
    return {
        "type": "LoRA",
        "lora_attn_modules": ["q_proj", "v_proj"],
        "apply_lora_to_mlp": False,
        "apply_lora_to_output": False,
        "rank": 4,
        "alpha": 8,
        **overrides,
    }


def training_config(
    dataset_id: str = "ds", *, epochs: int = 1, steps: int = 2, **data: Any
) -> dict[str, Any]:
    """A ``training_config`` of a few fp32 steps; ``data`` changes its ``data_config``."""
    return {
        "n_epochs": epochs,
        "max_steps_per_epoch": steps,
        "gradient_accumulation_steps": 1,
        "data_config": {
            "dataset_id": dataset_id,
            "batch_size": 2,
            "shuffle": False,
            "data_format": "instruct",
            **data,
        },
        "optimizer_config": {
            "optimizer_type": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "num_warmup_steps": 0,
        },
        "dtype": "fp32",
    }


def job_request(job_uuid: str, dataset_uri: str, **overrides: Any) -> dict[str, Any]:
    """A valid job.requested payload for the tiny model; ``overrides`` replace top-level fields."""
    data: dict[str, Any] = {
        "job_uuid": job_uuid,
        "model": MODEL,
        "training_config": training_config(),
        "algorithm_config": lora(),
        "hyperparam_search_config": {},
        "logger_config": {},
        "dataset": {"uri": dataset_uri, "format": "jsonl"},
    }
    data.update(overrides)
    return data


def write_dataset(path: Path, rows: int = 8) -> Path:
    """An ``instruct`` JSONL dataset in llama-stack's row shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            question = json.dumps([{"role": "user", "content": f"What is {i} plus {i}?"}])
            f.write(
                json.dumps({"chat_completion_input": question, "expected_answer": str(2 * i)})
                + "\n"
            )
    return path


def make_tiny_model(out: Path, timeout: float = 300) -> Path:
    """The project's tiny random-weight model, written by the real ``tiny-model`` command."""
    subprocess.run(
        [sys.executable, "-m", "pipelines", "tiny-model", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    return out
