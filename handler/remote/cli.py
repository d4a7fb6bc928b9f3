"""Remote mode's command: ``upload-model`` (put a local model where remote runs find it).

Mounted into ``kfp-trainer`` by provider/cli.py through :func:`register`; boto3 and the model
registry are imported inside the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_CHECKPOINTS = Path("~/.llama/checkpoints")  # where `llama model download` puts models


def register(subparsers: Any) -> None:
    """Add ``upload-model`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "upload-model",
        help="pack a local model directory and upload it to S3 for remote runs",
        description=(
            "Packs the model directory as a tar and uploads it to "
            "s3://$S3_BUCKET/$S3_PREFIX/models/<model>.tar (endpoint from S3_ENDPOINT_URL, "
            "credentials from AWS_* or a profile). Skips the upload when the same digest is "
            "already there. Prints a JSON summary."
        ),
    )
    p.add_argument("--model", required=True, help="registry model name, e.g. Llama3.2-1B-Instruct")
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        type=Path,
        help=f"model directory (default: {DEFAULT_CHECKPOINTS}/<model>)",
    )
    p.set_defaults(func=_upload_model)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _upload_model(args: argparse.Namespace) -> int:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from handler.remote import s3
    from handler.settings import HandlerSettings, SettingsError
    from pipelines.models import UnknownModelError, lookup

    try:
        name = lookup(args.model).name
    except UnknownModelError as exc:
        return _error(str(exc))
    source = (args.source or DEFAULT_CHECKPOINTS / name).expanduser()
    if not source.is_dir():
        hint = (
            "; generate it with `kfp-trainer tiny-model --out DIR` and pass --from DIR"
            if name == "llama3.2-tiny"
            else "; pass --from DIR"
        )
        return _error(f"model directory {str(source)!r} does not exist{hint}")
    try:
        remote = HandlerSettings.from_env(os.environ).remote
        client = s3.s3_client(remote)
        upload = s3.upload_model(client, remote, name, source)
    except (SettingsError, s3.S3ConfigError, ValueError) as exc:
        return _error(str(exc))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        return _error(f"S3 refused the upload to bucket {remote.s3_bucket!r}: {code or exc}")
    except S3UploadFailedError as exc:  # boto3's transfer wraps the ClientError
        return _error(f"S3 refused the upload to bucket {remote.s3_bucket!r}: {exc}")
    except BotoCoreError as exc:
        return _error(f"cannot reach S3 ({remote.s3_endpoint_url or 'AWS'}): {exc}")
    print(
        json.dumps(
            {
                "model": name,
                "uri": upload.uri,
                "sha256": upload.sha256,
                "bytes": upload.size,
                "uploaded": not upload.skipped,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m handler.remote.cli upload-model ...`` (the same command as kfp-trainer's)."""
    parser = argparse.ArgumentParser(prog="python -m handler.remote.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
