"""Turning a row's chat turns into the token ids and labels the trainer learns from.

Kept apart from the training loop so the chat format has one owner: the ids must equal what
inference sees for the same messages (llama-stack's formatter, the HF chat template).
"""

from __future__ import annotations

from typing import Any, Final

from pipelines.data import Turn

IGNORE_INDEX: Final = -100


def to_messages(turns: list[Turn], train_on_input: bool) -> list[Any]:
    """torchtune messages; prompt turns are masked unless ``train_on_input``."""
    from torchtune.data import Message

    return [
        Message(role=t.role, content=t.content, masked=t.role != "assistant" and not train_on_input)
        for t in turns
    ]


def tokenize(rows: list[list[Turn]], tokenizer: Any, train_on_input: bool) -> list[dict]:
    """Token ids and labels (prompt tokens ignored unless train_on_input) per row."""
    samples = []
    for turns in rows:
        tokens, mask = tokenizer.tokenize_messages(to_messages(turns, train_on_input))
        labels = [IGNORE_INDEX if m else t for t, m in zip(tokens, mask, strict=True)]
        samples.append({"tokens": tokens, "labels": labels})
    return samples


__all__ = ["IGNORE_INDEX", "to_messages", "tokenize"]
