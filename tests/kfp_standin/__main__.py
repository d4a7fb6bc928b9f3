"""``python -m tests.kfp_standin``: serve the stand-in on 127.0.0.1 until interrupted."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from tests.kfp_standin.server import KfpStandin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kfp_standin", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--token", default="", help="required bearer token; empty: no auth")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs execute")
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a Kubernetes Secret for secretAsEnv: NAME and a JSON object of its keys",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    standin = KfpStandin(token=args.token or None, work_dir=args.work_dir, port=args.port)
    for item in args.secret:
        name, _, data = item.partition("=")
        standin.set_secret(name, json.loads(data))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with standin:
        print(json.dumps({"url": standin.url}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
