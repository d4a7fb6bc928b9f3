"""Write a small instruct-format sample dataset as csv (what localfs datasetio reads).

Columns are llama-stack's instruct format: ``chat_completion_input`` (a JSON list of messages)
and ``expected_answer``. The questions are simple arithmetic, so a loss curve means something
even on the tiny random model.

    python scripts/sample_dataset.py --out data/train.csv --rows 64
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLUMNS = ("chat_completion_input", "expected_answer")


def sample_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic question/answer rows."""
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 9 + 1, (i * 7) % 11
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        rows.append(
            {
                "chat_completion_input": json.dumps(messages),
                "expected_answer": f"{a} plus {b} is {a + b}.",
            }
        )
    return rows


def write_sample_csv(path: Path, n: int = 64, offset: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(sample_rows(n, offset))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--offset", type=int, default=0, help="first row number (for validation)")
    args = parser.parse_args()
    print(write_sample_csv(args.out, args.rows, args.offset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
