"""The token ids we train on are the ids inference sees: Hugging Face's apply_chat_template
(with the tokenizer transformers wrote for the tiny model) and llama-stack's own ChatFormat, for
an instruct row and a dialog row. Masking follows train_on_input; truncation is counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchtune.data import Message

from pipelines.chat_format import IGNORE_INDEX, tokenize
from pipelines.data import DatasetError, read_dataset, row_turns
from pipelines.modeling import open_base
from pipelines.models import lookup
from tests.pipelines.loaders import chat_ids

INSTRUCT_ROW = {
    "chat_completion_input": json.dumps([{"role": "user", "content": "What is 2 plus 2?"}]),
    "expected_answer": "2 plus 2 is 4.",
}
DIALOG_ROW = {
    "dialog": json.dumps(
        [
            {"role": "user", "content": "Name a color of the sky."},
            {"role": "assistant", "content": "The sky is blue."},
            {"role": "user", "content": "And at night?"},
            {"role": "assistant", "content": "At night it is dark."},
        ]
    )
}
ROWS = {"instruct": INSTRUCT_ROW, "dialog": DIALOG_ROW}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return open_base(tiny_model, lookup("llama3.2-tiny")).tokenizer(256)


def _turns(data_format: str):
    return row_turns(ROWS[data_format], data_format, "row")


def _messages(data_format: str) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in _turns(data_format)]


@pytest.mark.parametrize("data_format", ["instruct", "dialog"])
def test_ids_equal_hf_apply_chat_template(tokenizer, tiny_hf: Path, data_format: str) -> None:
    from transformers import AutoTokenizer

    (sample,) = tokenize([_turns(data_format)], tokenizer, train_on_input=False).samples
    hf = AutoTokenizer.from_pretrained(tiny_hf)
    assert sample["tokens"] == chat_ids(hf, _messages(data_format))
    # The prompt a server builds for the answer is exactly what precedes it in training.
    prompt = chat_ids(hf, _messages(data_format)[:-1], add_generation_prompt=True)
    assert sample["tokens"][: len(prompt)] == prompt
    # The last user turn is not learned; the answer (from its header on) is.
    user_end = len(chat_ids(hf, _messages(data_format)[:-1]))
    assert sample["labels"][user_end - 1] == IGNORE_INDEX
    assert IGNORE_INDEX not in sample["labels"][user_end:]


@pytest.mark.parametrize("data_format", ["instruct", "dialog"])
def test_ids_equal_llama_stacks_chat_format(tokenizer, tiny_model: Path, data_format: str) -> None:
    from llama_stack.models.llama.datatypes import RawMessage, StopReason
    from llama_stack.models.llama.llama3.chat_format import ChatFormat
    from llama_stack.models.llama.llama3.tokenizer import Tokenizer

    formatter = ChatFormat(Tokenizer(tiny_model / "tokenizer.model"))
    messages = [
        RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
        for m in _messages(data_format)
    ]
    (sample,) = tokenize([_turns(data_format)], tokenizer, train_on_input=False).samples
    expected = [formatter.tokenizer.bos_id]
    for message in messages:
        expected += formatter.encode_message(message, tool_prompt_format=None)[0]
    assert sample["tokens"] == expected
    prompt = formatter.encode_dialog_prompt(messages[:-1]).tokens  # what inference feeds in
    assert sample["tokens"][: len(prompt)] == prompt


def test_train_on_input_decides_which_tokens_are_learned(tokenizer) -> None:
    turns = _turns("dialog")
    answer_only = tokenize([turns], tokenizer, train_on_input=False).samples[0]
    everything = tokenize([turns], tokenizer, train_on_input=True).samples[0]
    assert answer_only["tokens"] == everything["tokens"]
    assert everything["labels"][1:] == everything["tokens"][1:]  # all but <|begin_of_text|>
    learned = [t for t in answer_only["labels"] if t != IGNORE_INDEX]
    # Exactly the two assistant messages: header, text and <|eot_id|> each.
    expected = []
    for t in turns:
        if t.role == "assistant":
            expected += tokenizer.tokenize_message(Message(t.role, t.content))
    assert learned == expected
    assert tokenizer.eot_id in learned and tokenizer.eos_id not in answer_only["tokens"]


def _long_prompt_rows(path: Path, long: int, short: int) -> Path:
    with path.open("w") as f:
        for i in range(long + short):
            question = ("word " * (400 if i < long else 3)) + "?"
            row = {
                "chat_completion_input": json.dumps([{"role": "user", "content": question}]),
                "expected_answer": f"answer {i}",
            }
            f.write(json.dumps(row) + "\n")
    return path


def test_rows_truncation_leaves_nothing_to_learn_are_counted(tokenizer, tmp_path: Path) -> None:
    rows = read_dataset(_long_prompt_rows(tmp_path / "mixed.jsonl", 3, 2), "instruct")
    tokenized = tokenize(rows, tokenizer, train_on_input=False)
    assert tokenized.without_trainable_tokens == 3 and len(tokenized.samples) == 2
    assert all(len(s["tokens"]) <= 256 for s in tokenized.samples)
    # With train_on_input the prompt itself is learned: nothing is dropped.
    assert tokenize(rows, tokenizer, train_on_input=True).without_trainable_tokens == 0


def test_no_row_left_fails_naming_the_limit(tokenizer, tmp_path: Path) -> None:
    rows = read_dataset(_long_prompt_rows(tmp_path / "long.jsonl", 4, 0), "instruct")
    with pytest.raises(
        DatasetError,
        match=r"^dataset: no row left to train on: all 4 rows lose every answer token when cut "
        r"to the sequence limit of 256 tokens",
    ):
        tokenize(rows, tokenizer, train_on_input=False)
