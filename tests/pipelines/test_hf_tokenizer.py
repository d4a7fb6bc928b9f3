"""Our tiktoken <-> tokenizer.json conversion (the trainer has no transformers) against the real
thing: tiktoken itself, transformers' own TikTokenConverter, and Meta's real Llama 3 vocabulary
(the tokenizer.model llama-stack ships)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import hf_tokenizer
from pipelines.bpe import CORPUS, read_ranks
from pipelines.hf_tokenizer import TokenizerFormatError, build_tokenizer_json
from pipelines.models import TINY_BASE_VOCAB
from tests.pipelines.loaders import chat_ids

SAMPLES = (
    CORPUS,
    "Hello, world!  Two  spaces, tabs\tand\nnew lines\n\n",
    "Numbers 1234567 and 3.14159; emoji 🦙 and accents: café, naïve, Ångström.",
    "def f(x):\n    return x ** 2  # code\n",
    "Don't stop; we'll see what you've got, they're 'quoted'.",
    "中文字符和日本語のテキスト",
)


def _tiktoken_ids(ranks: dict[bytes, int], text: str) -> list[int]:
    import tiktoken

    enc = tiktoken.Encoding(
        name="t", pat_str=hf_tokenizer.PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    return enc.encode(text, disallowed_special=())


def test_tiny_vocabulary_encodes_as_tiktoken_and_as_transformers_converter(
    tiny_model: Path,
) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_ranks(tiny_model / "tokenizer.model")
    ours = build_tokenizer_json(ranks)
    theirs = TikTokenConverter(
        vocab_file=str(tiny_model / "tokenizer.model"), pattern=hf_tokenizer.PATTERN
    ).converted()
    for text in SAMPLES:
        expected = _tiktoken_ids(ranks, text)
        assert ours.encode(text, add_special_tokens=False).ids == expected
        assert theirs.encode(text, add_special_tokens=False).ids == expected
        assert ours.decode(expected) == text
    assert ours.encode("Hi").ids[0] == TINY_BASE_VOCAB  # <|begin_of_text|> added, as Llama 3's


def test_the_real_llama3_vocabulary_converts_exactly() -> None:
    """Meta's 128,000-token vocabulary (shipped inside llama-stack) through our converter."""
    import llama_stack.models.llama.llama3 as llama3

    ranks = read_ranks(Path(llama3.__file__).parent / "tokenizer.model")
    assert len(ranks) == 128_000
    tokenizer = build_tokenizer_json(ranks)
    for text in SAMPLES:
        assert tokenizer.encode(text, add_special_tokens=False).ids == _tiktoken_ids(ranks, text)
    assert tokenizer.token_to_id("<|eot_id|>") == 128_009
    assert tokenizer.get_vocab_size() == 128_256


def test_tokenizer_json_round_trips_to_the_tiktoken_file(tiny_hf: Path, tiny_model: Path) -> None:
    """transformers wrote tiny_hf's tokenizer.json; we read the same ranks back out of it."""
    ranks = hf_tokenizer.ranks_from_tokenizer_json(tiny_hf / "tokenizer.json")
    assert ranks == read_ranks(tiny_model / "tokenizer.model")


def test_written_hf_tokenizer_loads_in_transformers(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer.write_hf_tokenizer(read_ranks(tiny_model / "tokenizer.model"), tmp_path, 4096)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (TINY_BASE_VOCAB, TINY_BASE_VOCAB + 9)
    assert tok.model_max_length == 4096
    ids = chat_ids(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"type": "Unigram", "vocab": []}}, r"holds a 'Unigram' model"),
        ({"added_tokens": []}, r"<\|begin_of_text\|>.* are not at Llama 3's ids"),
    ],
)
def test_a_tokenizer_json_that_is_not_llama3s_is_refused(
    tmp_path: Path, tiny_hf: Path, change: dict, message: str
) -> None:
    data = json.loads((tiny_hf / "tokenizer.json").read_text())
    data.update(change)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFormatError, match=message):
        hf_tokenizer.ranks_from_tokenizer_json(tmp_path / "tokenizer.json")


def test_every_split_into_two_tokens_is_a_merge() -> None:
    """tiktoken joins any adjacent pair that makes a token; ``.:.:`` (in Meta's vocabulary) can
    only come whole or from ``.:`` + ``.:``, never from its bytes merged in rank order."""
    ranks = {bytes([b]): b for b in range(256)} | {b":.": 256, b".:": 257, b".:.:": 258}
    assert hf_tokenizer.merges(ranks) == [(b":", b"."), (b".", b":"), (b".:", b".:")]
    tokenizer = build_tokenizer_json(ranks)
    for text in (".:.:", "x.:.:", ".:.:.", ".:", ":.:."):
        assert tokenizer.encode(text, add_special_tokens=False).ids == _tiktoken_ids(ranks, text)
