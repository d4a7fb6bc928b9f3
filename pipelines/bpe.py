"""A tiny byte-level BPE vocabulary written in tiktoken's file format (no torch, no download).

``llama3.2-tiny`` needs a real tokenizer.model that torchtune's Llama 3 tokenizer can load. We
learn a handful of merges from a built-in paragraph: all 256 single bytes first (ranks 0-255),
then each merge's bytes at the next rank. The file is lines of ``base64(token) rank``, the
format of Meta's ``tokenizer.model``; ``read_ranks`` and ``write_ranks`` are its reader and writer.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path
from typing import Final

CORPUS: Final = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? The capital "
    "of France is Paris. How many legs does a spider have? A spider has eight legs. Please "
    "answer the question in one short sentence. The assistant answers the user and the user "
    "thanks the assistant. Training a model on a dataset of questions and answers is called "
    "fine-tuning; low-rank adaptation trains only small adapter matrices. Hello, world! "
    "Which number is larger, three or seven? Seven is larger than three. Translate good "
    "morning into French: bonjour. Name a color of the sky: blue. "
)
_WORDS: Final = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def learn_merges(text: str, n_merges: int) -> list[bytes]:
    """The first ``n_merges`` new tokens (as bytes) of a deterministic BPE over ``text``."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in _WORDS.findall(text))
    vocab: set[bytes] = {bytes([b]) for b in range(256)}
    merges: list[bytes] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += count
        if not pairs:
            raise ValueError(f"corpus too small for {n_merges} merges (got {len(merges)})")
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        new = a + b
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
        if new not in vocab:
            vocab.add(new)
            merges.append(new)
    return merges


def ranks(n_merges: int, text: str = CORPUS) -> dict[bytes, int]:
    """Token bytes -> rank: the 256 bytes, then the merges."""
    table = {bytes([b]): b for b in range(256)}
    for i, token in enumerate(learn_merges(text, n_merges)):
        table[token] = 256 + i
    return table


def write_ranks(path: Path, table: dict[bytes, int]) -> int:
    """Write ``table`` as a tiktoken BPE file (``base64(token) rank`` lines); return its size."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in table.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")
    return len(table)


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file as token bytes -> rank (what ``write_ranks`` wrote, or Meta's file).

    :raises ValueError: naming the line that is not ``base64 rank``.
    """
    table: dict[bytes, int] = {}
    with Path(path).open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                table[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"line {lineno} is not 'base64-token rank'") from None
    return table


def write_tiktoken_file(path: Path, n_merges: int, text: str = CORPUS) -> int:
    """Write a tiktoken BPE file with ``256 + n_merges`` tokens; return that count."""
    return write_ranks(path, ranks(n_merges, text))


def count_tokens(path: Path) -> int:
    """Number of base (non-special) tokens in a tiktoken BPE file, without loading tiktoken."""
    with Path(path).open("rb") as f:
        return sum(1 for line in f if line.strip())


__all__ = [
    "CORPUS",
    "count_tokens",
    "learn_merges",
    "ranks",
    "read_ranks",
    "write_ranks",
    "write_tiktoken_file",
]
