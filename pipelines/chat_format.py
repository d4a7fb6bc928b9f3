"""Turning a row's chat turns into the token ids and labels the trainer learns from.

Kept apart from the training loop so the chat format has one owner: the ids must equal what
inference sees for the same messages. That is Llama 3's format as llama-stack's ``ChatFormat``
encodes it and as :data:`CHAT_TEMPLATE` (the chat template our Hugging Face checkpoints carry)
renders it::

    <|begin_of_text|>
    for each message: <|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>

No ``<|end_of_text|>`` follows (inference never sees one; torchtune's ``tokenize_messages`` would
append it). Message text is stripped, as torchtune and the Llama 3 chat templates do.
Inference servers may add a default system message of their own (llama-stack an empty one for
Llama 3.2, Meta's Hugging Face template a knowledge-date one); training sees only the row's own
messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pipelines.data import DatasetError, Turn

IGNORE_INDEX: Final = -100

# Jinja, as transformers' apply_chat_template and vLLM run it: the format above, plus the
# assistant header when a generation prompt is asked for.
CHAT_TEMPLATE: Final = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + content | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class TokenizedRows:
    """Training samples (``tokens``, ``labels``) and how many rows truncation left unlearnable.

    Rows with no label left after truncation are dropped: they would add steps, not learning.
    """

    samples: list[dict[str, list[int]]]
    without_trainable_tokens: int


def to_messages(turns: list[Turn], train_on_input: bool) -> list[Any]:
    """torchtune messages; prompt turns are masked unless ``train_on_input``."""
    from torchtune.data import Message

    return [
        Message(role=t.role, content=t.content, masked=t.role != "assistant" and not train_on_input)
        for t in turns
    ]


def encode(turns: list[Turn], tokenizer: Any, train_on_input: bool) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation, untruncated; masked positions are ignored."""
    tokens = [tokenizer.bos_id]
    labels = [IGNORE_INDEX]
    for message in to_messages(turns, train_on_input):
        ids = tokenizer.tokenize_message(message)  # header + text + <|eot_id|>
        tokens += ids
        labels += [IGNORE_INDEX] * len(ids) if message.masked else ids
    return tokens, labels


def tokenize(
    rows: list[list[Turn]],
    tokenizer: Any,
    train_on_input: bool,
    *,
    label: str = "dataset",
) -> TokenizedRows:
    """Samples cut to ``tokenizer.max_seq_len``; rows left with nothing to learn are counted.

    :raises DatasetError: no row has a trainable token left, naming the sequence limit.
    """
    limit = tokenizer.max_seq_len
    samples = []
    for turns in rows:
        tokens, labels = encode(turns, tokenizer, train_on_input)
        if limit:
            tokens, labels = tokens[:limit], labels[:limit]
        # labels[0] predicts nothing (the loss shifts labels left by one).
        if any(t != IGNORE_INDEX for t in labels[1:]):
            samples.append({"tokens": tokens, "labels": labels})
    dropped = len(rows) - len(samples)
    if rows and not samples:
        raise DatasetError(
            f"{label}: no row left to train on: all {len(rows)} rows lose every answer token "
            f"when cut to the sequence limit of {limit} tokens (the model's max_seq_len); "
            "shorten the prompts or set data_config.train_on_input"
        )
    return TokenizedRows(samples=samples, without_trainable_tokens=dropped)


__all__ = ["CHAT_TEMPLATE", "IGNORE_INDEX", "TokenizedRows", "encode", "to_messages", "tokenize"]
