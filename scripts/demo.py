"""``make demo``: the whole local path in one command, on a laptop CPU, in well under 3 minutes.

1. generate the tiny random-weight model (``kfp-trainer tiny-model``) into .demo/models;
2. write a small sample dataset (instruct-format csv) into .demo/data;
3. start ``llama stack run run.yaml`` on a free loopback port (state in .demo/state);
4. train through the client (``kfp-trainer train``: register dataset, submit with the
   llama-stack-client SDK, progress bar from the job status);
5. print the checkpoint, stop the server.

Logs: .demo/console-*.log (server stdout) and .demo/llama-stack-*.log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from sample_dataset import write_sample_csv  # noqa: E402

from provider.launcher import StackServer  # noqa: E402

DEMO = ROOT / ".demo"
KFP_TRAINER = Path(sys.executable).with_name("kfp-trainer")
MODEL = "llama3.2-tiny"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    started = time.monotonic()
    models, state = DEMO / "models", DEMO / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh job list every run; the model is kept

    step(f"tiny model {MODEL}")
    if not (models / MODEL).is_dir():
        subprocess.run(
            [str(KFP_TRAINER), "tiny-model", "--out", str(models / MODEL)], check=True, timeout=300
        )
    else:
        print(f"(already there: {models / MODEL})")

    step("sample dataset")
    train = write_sample_csv(DEMO / "data" / "train.csv", 64)
    validation = write_sample_csv(DEMO / "data" / "eval.csv", 8, offset=1000)
    print(f"{train} (64 rows), {validation} (8 rows)")

    step("llama stack run run.yaml (local mode)")
    server = StackServer(
        {
            "KFP_TRAINER_STATE_DIR": str(state),
            "KFP_TRAINER_MODEL_STORE": str(models),
            # Set, not left to run.yaml's default: llama-stack's start-up lines are JSON too.
            "KFP_TRAINER_LOG_FORMAT": os.environ.get("KFP_TRAINER_LOG_FORMAT", "json"),
        },
        DEMO,
    )
    server.start(timeout_s=180)
    print(f"serving on {server.url}; logs in {server.console_log} and {server.log_file}")
    try:
        step("train through the llama-stack client")
        result = subprocess.run(
            [
                str(KFP_TRAINER),
                "train",
                "--url",
                server.url,
                "--model",
                MODEL,
                "--dataset",
                str(train),
                "--validation-dataset",
                str(validation),
                "--epochs",
                "2",
                "--max-steps-per-epoch",
                "8",
                "--timeout",
                "600",
            ],
            timeout=700,
        )
    finally:
        step("stopping the server")
        server.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s", flush=True)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
