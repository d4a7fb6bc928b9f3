"""The user's side of a fine-tuning job, through the llama-stack-client Python SDK.

``kfp-trainer train`` and scripts/demo.py use this: register a dataset, submit a LoRA job,
watch its status with a progress bar, report the outcome and the checkpoint paths. It talks to
``llama stack run`` over HTTP only, exactly like any other llama-stack user would.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TERMINAL = ("completed", "failed", "cancelled")
BAR_WIDTH = 30


@dataclass
class TrainOptions:
    """What one ``train`` run asks for; defaults suit the tiny model on a laptop CPU."""

    model: str = "llama3.2-tiny"
    dataset_id: str = ""
    validation_dataset_id: str | None = None
    job_uuid: str = field(default_factory=lambda: f"kfp-{uuid.uuid4().hex[:12]}")
    epochs: int = 1
    max_steps_per_epoch: int = 4
    gradient_accumulation_steps: int = 1
    batch_size: int = 2
    data_format: str = "instruct"
    lr: float = 1e-3
    rank: int = 4
    alpha: int = 8
    lora_modules: tuple[str, ...] = ("q_proj", "v_proj")
    apply_lora_to_mlp: bool = False
    dtype: str = "fp32"

    def training_config(self) -> dict[str, Any]:
        return {
            "n_epochs": self.epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_validation_steps": 2,
            "dtype": self.dtype,
            "data_config": {
                "dataset_id": self.dataset_id,
                "validation_dataset_id": self.validation_dataset_id,
                "batch_size": self.batch_size,
                "shuffle": True,
                "data_format": self.data_format,
                "train_on_input": False,
            },
            "optimizer_config": {
                "optimizer_type": "adamw",
                "lr": self.lr,
                "weight_decay": 0.0,
                "num_warmup_steps": 0,
            },
        }

    def algorithm_config(self) -> dict[str, Any]:
        return {
            "type": "LoRA",
            "lora_attn_modules": list(self.lora_modules),
            "apply_lora_to_mlp": self.apply_lora_to_mlp,
            "apply_lora_to_output": False,
            "rank": self.rank,
            "alpha": self.alpha,
        }


def connect(url: str, timeout: float = 60.0) -> Any:
    """An SDK client for ``url``.

    Importing the SDK turns the root logger on at INFO (llama_stack_client.lib.tools.mcp_oauth
    calls ``logging.basicConfig``); its per-request lines would tear the progress bar, so the
    HTTP loggers go back to warnings.
    """
    import logging

    from llama_stack_client import LlamaStackClient

    for name in ("httpx", "llama_stack_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return LlamaStackClient(base_url=url, timeout=timeout, max_retries=2)


def register_file_dataset(client: Any, path: Path, dataset_id: str | None = None) -> str:
    """Register a local csv/xlsx file (localfs datasetio reads those) and return its id."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    dataset = client.datasets.register(
        purpose="post-training/messages",
        source={"type": "uri", "uri": str(path)},
        dataset_id=dataset_id or path.stem,
    )
    return dataset.identifier


def register_rows_dataset(client: Any, rows: list[dict[str, Any]], dataset_id: str) -> str:
    """Register rows given inline (no file) and return the dataset id."""
    dataset = client.datasets.register(
        purpose="post-training/messages",
        source={"type": "rows", "rows": rows},
        dataset_id=dataset_id,
    )
    return dataset.identifier


def submit(client: Any, options: TrainOptions) -> str:
    """POST supervised_fine_tune; returns the job uuid at once (training runs in the pipeline)."""
    # No automatic retry: a retried submit would collide with the job it already created.
    job = client.with_options(max_retries=0).post_training.supervised_fine_tune(
        job_uuid=options.job_uuid,
        model=options.model,
        training_config=options.training_config(),
        algorithm_config=options.algorithm_config(),
        hyperparam_search_config={},
        logger_config={},
    )
    return job.job_uuid


def extra(status: Any, name: str) -> Any:
    """A field the provider adds to llama-stack's status (progress, error); None if absent."""
    value = getattr(status, name, None)
    if value is None and getattr(status, "model_extra", None):
        value = status.model_extra.get(name)
    return value


def render_bar(status: Any, elapsed: float) -> str:
    """One line: ``[#####.....] step 3/8  epoch 0  loss 2.71  in_progress  12s``."""
    progress = extra(status, "progress") or {}
    step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
    if status.status == "completed":
        step, total = max(step, total, 1), max(total, step, 1)
    filled = int(BAR_WIDTH * step / total) if total else 0
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    parts = [f"[{bar}]", f"step {step}/{total or '?'}"]
    if progress.get("phase") == "staging":
        parts.append(f"staging: {int(progress.get('rows_staged') or 0):,} rows")
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {float(progress['loss']):.3f}")
    parts += [status.status, f"{elapsed:.0f}s"]
    return "  ".join(parts)


def wait(
    client: Any,
    job_uuid: str,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
    out: TextIO = sys.stderr,
) -> Any:
    """Poll the job's status until it ends, drawing the progress bar on ``out``.

    :raises TimeoutError: the job did not end within ``timeout_s`` (it keeps running).
    """
    start = time.monotonic()
    tty = out.isatty()
    last_line = ""
    while True:
        status = client.post_training.job.status(job_uuid=job_uuid)
        line = render_bar(status, time.monotonic() - start)
        if tty:
            out.write("\r" + line.ljust(len(last_line)))
        elif line.split("  ")[:-1] != last_line.split("  ")[:-1]:
            out.write(line + "\n")  # not a terminal: one line per change, no redraws
        out.flush()
        last_line = line
        if status.status in TERMINAL:
            if tty:
                out.write("\n")
            return status
        if time.monotonic() - start > timeout_s:
            if tty:
                out.write("\n")
            raise TimeoutError(f"job {job_uuid} still {status.status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def checkpoint_paths(status: Any) -> list[tuple[str, str]]:
    """(identifier, path) of every checkpoint in a status or artifacts answer."""
    found = []
    for checkpoint in status.checkpoints or []:
        item = checkpoint if isinstance(checkpoint, dict) else checkpoint.to_dict()
        found.append((item["identifier"], item["path"]))
    return found


def report(status: Any, out: TextIO = sys.stdout) -> None:
    """The final lines: outcome, error when failed, checkpoint paths when completed."""
    out.write(f"job {status.job_uuid}: {status.status}\n")
    error = extra(status, "error")
    if error:
        out.write(f"error: {error}\n")
    for identifier, path in checkpoint_paths(status):
        out.write(f"checkpoint {identifier}: {path}\n")
    if status.resources_allocated:
        device = status.resources_allocated.get("device")
        peak = status.resources_allocated.get("peak_memory_gb")
        out.write(f"resources: device={device} peak_memory_gb={peak}\n")
    out.flush()
