"""``kfp-trainer``: one command line for every part of the project.

``main`` composes the ``register(subparsers)`` of pipelines/ (tiny-model, compile, run),
handler/ (serve, send), handler/remote/ (upload-model) and this package's ``train``. Each part
imports its heavy dependencies only when its command runs, so ``kfp-trainer --help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

PARTS = ("pipelines.cli", "handler.cli", "handler.remote.cli")
DEFAULT_URL = "http://127.0.0.1:8321"


def _train(args: argparse.Namespace) -> int:
    """Register the dataset, submit, wait with a progress bar, print the outcome."""
    from llama_stack_client import APIError

    from provider import client as sdk

    if not args.dataset and not args.dataset_id:
        print("give --dataset FILE.csv or --dataset-id ID", file=sys.stderr)
        return 2
    api = sdk.connect(args.url)
    options = sdk.TrainOptions(
        model=args.model,
        epochs=args.epochs,
        max_steps_per_epoch=args.max_steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        lora_modules=tuple(m.strip() for m in args.lora_modules.split(",") if m.strip()),
        dtype=args.dtype,
    )
    if args.job_uuid:
        options.job_uuid = args.job_uuid
    try:
        options.dataset_id = args.dataset_id or sdk.register_file_dataset(api, args.dataset)
        if args.validation_dataset:
            options.validation_dataset_id = sdk.register_file_dataset(
                api, args.validation_dataset, f"{args.validation_dataset.stem}-validation"
            )
        elif args.validation_dataset_id:
            options.validation_dataset_id = args.validation_dataset_id
        job_uuid = sdk.submit(api, options)
        print(f"submitted job {job_uuid} (model {options.model}, dataset {options.dataset_id})")
        if args.no_wait:
            return 0
        status = sdk.wait(api, job_uuid, timeout_s=args.timeout, poll_s=args.poll)
    except (APIError, FileNotFoundError, TimeoutError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    sdk.report(status)
    return 0 if status.status == "completed" else 1


def _message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return str(exc)


def register(subparsers: Any) -> None:
    """Add ``train`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune through a running `llama stack run` (dataset, submit, progress bar)",
        description=_train.__doc__,
    )
    p.add_argument("--url", default=os.environ.get("LLAMA_STACK_URL", DEFAULT_URL))
    p.add_argument("--model", default="llama3.2-tiny", help="model name (registry name)")
    p.add_argument("--dataset", type=Path, help="csv/xlsx file to register and train on")
    p.add_argument("--dataset-id", help="an already registered dataset instead of --dataset")
    p.add_argument("--validation-dataset", type=Path, help="csv/xlsx validation file")
    p.add_argument("--validation-dataset-id", help="an already registered validation dataset")
    p.add_argument("--job-uuid", help="job id (default: generated)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps-per-epoch", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=8, help="LoRA alpha")
    p.add_argument("--lora-modules", default="q_proj,v_proj", help="comma list of attn modules")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the end")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    p.add_argument("--no-wait", action="store_true", help="submit and return")
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfp-trainer",
        description="Event-driven LoRA fine-tuning for Llama Stack on Kubeflow Pipelines.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part is not installed here; its commands are simply absent
            raise
        module.register(subparsers)
    register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``kfp-trainer`` entry point."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
