"""The pipeline's commands: ``tiny-model``, ``compile`` and ``run`` (argparse subcommands).

``kfp-trainer`` (provider/cli.py) and ``python -m pipelines`` both mount them through
:func:`register`. Heavy imports (kfp, torch) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``tiny-model``, ``compile`` and ``run`` to an argparse subparsers object."""
    p = subparsers.add_parser("tiny-model", help="write the random-weight llama3.2-tiny model")
    p.add_argument("--out", required=True, type=Path, help="directory to create")
    p.add_argument(
        "--format",
        choices=("meta", "huggingface"),
        default="meta",
        help="layout: meta (`llama model download`) or huggingface (needs transformers)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same weights)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype")
    p.add_argument(
        "--max-shard-size", help="huggingface: split weights into shards (e.g. 100KB) + index"
    )
    p.set_defaults(func=_tiny_model)

    p = subparsers.add_parser("compile", help="write the pipeline's KFP IR YAML")
    p.add_argument("--out", required=True, type=Path, help="YAML file to write")
    p.set_defaults(func=_compile)

    p = subparsers.add_parser("run", help="run one job request locally through KFP's runner")
    p.add_argument("--request", required=True, type=Path, help="job request JSON file")
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    p.add_argument("--progress", type=Path, help="progress record JSON, updated while training")
    p.add_argument(
        "--workdir",
        type=Path,
        help="pipeline root and outputs (default: <KFP_TRAINER_STATE_DIR>/runs/<job_uuid>)",
    )
    p.add_argument("--model-store", help="where model names resolve (dir or s3://bucket/prefix)")
    p.set_defaults(func=_run)


def _tiny_model(args: argparse.Namespace) -> int:
    # torchao prints an import notice on stdout; keep stdout for the JSON answer.
    with contextlib.redirect_stdout(sys.stderr):
        from pipelines.tiny import write_tiny_model

        try:
            out = write_tiny_model(
                args.out,
                seed=args.seed,
                layout=args.format,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
            )
        except ModuleNotFoundError as exc:
            print(
                f"error: --format {args.format} needs {exc.name} (pip install "
                f"'llama-stack-provider-kfp-trainer[dev]')",
                file=sys.stderr,
            )
            return 2
    print(json.dumps({"model": "llama3.2-tiny", "format": args.format, "path": str(out.resolve())}))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import compile_pipeline
    from pipelines.settings import PipelineSettings

    out = compile_pipeline(PipelineSettings.from_env(), args.out)
    print(json.dumps({"pipeline": str(out.resolve())}))
    return 0


def _fail(request: dict[str, Any], error: str, out: Path | None) -> int:
    from pipelines.result import RunResult

    result = RunResult(job_uuid=str(request.get("job_uuid") or ""), status="failed", error=error)
    print(result.to_json())
    if out:
        result.write(out)
    return 1


def _state_dir() -> Path:
    """KFP_TRAINER_STATE_DIR, with the default the handler and the provider use: runs land
    there, never in the current directory (often a checkout)."""
    return Path(
        os.environ.get("KFP_TRAINER_STATE_DIR") or "~/.local/share/kfp-trainer"
    ).expanduser()


def _run(args: argparse.Namespace) -> int:
    from pipelines import logs, tracing
    from pipelines.local import SERVICE_NAME, run_request
    from pipelines.settings import PipelineSettings
    from pipelines.staging import StagingError, resolve_model_uri
    from pipelines.storage import StorageUnavailable
    from pipelines.validation import check_request

    logs.configure(os.environ.get("KFP_TRAINER_LOG_LEVEL", "INFO"))
    try:
        request = json.loads(args.request.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read request {str(args.request)!r}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(request, dict):
        return _fail({}, f"request {str(args.request)!r} is not a JSON object", args.out)
    settings = PipelineSettings.from_env()
    if not (request.get("model_artifact") or {}).get("uri"):
        store = args.model_store or os.environ.get("KFP_TRAINER_MODEL_STORE", "")
        try:
            uri = resolve_model_uri(str(request.get("model", "")), store)
        except (StagingError, StorageUnavailable) as exc:
            return _fail(request, f"model_artifact.uri: {exc}", args.out)
        request = {**request, "model_artifact": {"uri": uri}}
    problems = check_request(request)
    if problems:
        return _fail(request, "; ".join(problems), args.out)
    logs.set_job(request["job_uuid"], request.get("trace"))
    workdir = args.workdir or _state_dir() / "runs" / request["job_uuid"]
    tracing.init(SERVICE_NAME)
    try:
        result = run_request(
            request, settings=settings, workdir=workdir, progress_path=args.progress
        )
    finally:
        tracing.flush()
    print(result.to_json())
    if args.out:
        result.write(args.out)
    return 0 if result.status == "completed" else 1


__all__ = ["register"]
