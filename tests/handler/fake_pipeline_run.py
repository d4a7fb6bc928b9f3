"""A stand-in for ``python -m pipelines run`` with the same arguments and files, for tests of
process handling (spawn, progress, exit codes, cancel, adoption) that must be fast and exact.

The request's ``logger_config.fake`` says what to do: ``steps``, ``step_s``, ``outcome``
("completed" | "failed" | "crash"), ``grandchild`` (start a ``sleep`` in the same process group
and write its pid to ``<workdir>/grandchild.pid``). Each start appends a line to
``<workdir>/starts.log``. The real pipeline is exercised by test_training.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def _atomic(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--request", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--progress", type=Path, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    args = p.parse_args()
    request = json.loads(args.request.read_text())
    job = request["job_uuid"]
    cfg = request.get("logger_config", {}).get("fake", {})
    args.workdir.mkdir(parents=True, exist_ok=True)
    with (args.workdir / "starts.log").open("a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")
    if cfg.get("grandchild"):
        child = subprocess.Popen(["sleep", "120"])
        (args.workdir / "grandchild.pid").write_text(str(child.pid))
    steps = int(cfg.get("steps", 3))
    for step in range(1, steps + 1):
        _atomic(
            args.progress,
            {
                "step": step,
                "total_steps": steps,
                "epoch": 0,
                "loss": 1.0 / step,
                "updated_at": datetime.now(UTC).isoformat(),
            },
        )
        time.sleep(float(cfg.get("step_s", 0.05)))
    outcome = cfg.get("outcome", "completed")
    if outcome == "crash":
        print("boom: simulated crash in the trainer", file=sys.stderr)
        return 3
    ckpt = args.workdir / "checkpoints" / "epoch_0"
    ckpt.mkdir(parents=True, exist_ok=True)
    result = {
        "job_uuid": job,
        "status": outcome,
        "error": "simulated training failure" if outcome == "failed" else None,
        "checkpoints": [
            {
                "identifier": f"{request['model']}-sft-0",
                "created_at": datetime.now(UTC).isoformat(),
                "epoch": 0,
                "post_training_job_id": job,
                "path": str(ckpt),
                "training_metrics": {
                    "epoch": 0,
                    "train_loss": 0.5,
                    "validation_loss": None,
                    "perplexity": None,
                },
            }
        ]
        if outcome == "completed"
        else [],
        "metrics": [],
        "resources_allocated": {"device": "cpu", "dtype": "fp32"},
        "dataset_rows": 8,
        "rows_without_trainable_tokens": 1,
    }
    _atomic(args.out, result)
    print(json.dumps(result))
    return 0 if outcome == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
