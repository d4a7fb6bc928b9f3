"""The handler's commands: ``serve`` (gunicorn with the project's config) and ``send``.

``register(subparsers)`` adds them to ``kfp-trainer``; ``python -m handler.cli`` runs them on
their own. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")


def _serve(args: argparse.Namespace) -> int:
    """Replace this process with gunicorn (so SIGTERM reaches gunicorn's master directly)."""
    env = dict(os.environ)
    if args.port is not None:
        env["PORT"] = str(args.port)
    if args.bind:
        env["GUNICORN_BIND"] = args.bind
    if args.workers is not None:
        env["GUNICORN_WORKERS"] = str(args.workers)
    if args.threads is not None:
        env["GUNICORN_THREADS"] = str(args.threads)
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "handler:create_app()"]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SystemExit(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{path} must hold a JSON object (the job.requested data)")
    return value


def _send(args: argparse.Namespace) -> int:
    """POST one job.requested (or cancel) event and print the answer."""
    import requests

    from handler import contract

    if args.cancel:
        event_type, data = contract.JOB_CANCEL_REQUESTED, {"job_uuid": args.cancel}
    else:
        event_type, data = contract.JOB_REQUESTED, _load_json(args.request)
    try:
        event = contract.make_event(event_type, args.source, data)
    except contract.ContractError as exc:
        print(f"the request does not fit the contract: {exc}", file=sys.stderr)
        return 2
    message = contract.to_http(event, structured=args.structured)
    try:
        resp = requests.post(args.sink, headers=message.headers, data=message.body, timeout=30)
    except requests.RequestException as exc:
        print(f"cannot reach {args.sink}: {exc}", file=sys.stderr)
        return 3
    out: dict = {"status": resp.status_code}
    ce_headers = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("ce-")}
    if ce_headers:
        out["event"] = ce_headers
    try:
        out["body"] = resp.json()
    except ValueError:
        out["body"] = resp.text
    print(json.dumps(out, indent=2))
    return 0 if resp.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``send`` to an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="run the event handler under gunicorn")
    p.add_argument("--port", type=int, help="listen on 0.0.0.0:PORT (default: $PORT or 8080)")
    p.add_argument("--bind", help="full gunicorn bind address, e.g. 127.0.0.1:8080")
    p.add_argument("--workers", type=int, help="worker processes (default: $GUNICORN_WORKERS or 2)")
    p.add_argument(
        "--threads", type=int, help="threads per worker (default: $GUNICORN_THREADS or 1)"
    )
    p.set_defaults(func=_serve)

    p = subparsers.add_parser("send", help="POST a job request CloudEvent to a handler or broker")
    p.add_argument("--sink", required=True, help="URL to POST to, e.g. http://127.0.0.1:8080/")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--request", type=Path, help="JSON file with the job.requested data")
    what.add_argument("--cancel", metavar="JOB_UUID", help="send job.cancel.requested instead")
    p.add_argument("--structured", action="store_true", help="structured mode (default: binary)")
    p.add_argument("--source", default="/kfp-trainer/cli", help="ce-source of the sent event")
    p.set_defaults(func=_send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
