"""``python -m pipelines <command>``: the pipeline commands without the kfp-trainer wrapper."""

from __future__ import annotations

import argparse
import sys

from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
