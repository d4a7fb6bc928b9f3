"""Llama 3's tokenizer in both real layouts: Meta's tiktoken ``tokenizer.model`` and Hugging
Face's ``tokenizer.json`` + ``tokenizer_config.json``, converted either way without transformers.

The training image has no transformers, yet a Hugging Face checkpoint written from a Meta input
needs the fast tokenizer file that transformers and vLLM load, and a Meta checkpoint written from
a Hugging Face input needs ``tokenizer.model``. Both are the same byte-level BPE: tiktoken keeps
token bytes -> rank; ``tokenizer.json`` keeps the GPT-2 byte-to-unicode spelling of each token
with its id (= rank) plus the merge list, which is recovered from the ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pipelines.chat_format import CHAT_TEMPLATE
from pipelines.models import LLAMA3_SPECIAL_SLOTS

# Llama 3.1/3.2's 256 special tokens, in Hugging Face's naming, as offsets from the base vocab.
SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 3 + LLAMA3_SPECIAL_SLOTS - 11)),
)
assert len(SPECIAL_TOKENS) == LLAMA3_SPECIAL_SLOTS
BOS: Final = "<|begin_of_text|>"
EOS: Final = "<|eot_id|>"  # what the Instruct models' tokenizer_config names as eos_token
STOP_TOKENS: Final = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # generation_config's eos
# The pre-tokenizer split of Llama 3 (tiktoken's pat_str in Meta's and torchtune's tokenizer).
PATTERN: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class TokenizerFormatError(ValueError):
    """A tokenizer file is not a Llama 3 byte-level BPE; the message says what does not fit."""


def special_token_ids(base_vocab: int) -> dict[str, int]:
    """Each special token's id above a base vocabulary of ``base_vocab`` tokens."""
    return {name: base_vocab + i for i, name in enumerate(SPECIAL_TOKENS)}


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies spell with.

    Printable Latin-1 bytes stand for themselves; the rest map, in order, to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_ALPHABET: Final = _byte_alphabet()
_FROM_ALPHABET: Final = {ch: b for b, ch in enumerate(_ALPHABET)}


def spell(token: bytes) -> str:
    """A token's bytes as byte-level BPE spells them in ``tokenizer.json``."""
    return "".join(_ALPHABET[b] for b in token)


def unspell(text: str) -> bytes:
    """The inverse of :func:`spell`.

    :raises TokenizerFormatError: a character outside the byte-level alphabet.
    """
    try:
        return bytes(_FROM_ALPHABET[ch] for ch in text)
    except KeyError as exc:
        raise TokenizerFormatError(
            f"vocabulary entry {text!r} is not byte-level BPE (character {exc.args[0]!r})"
        ) from None


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list that reproduces tiktoken's encoding with ``ranks``.

    tiktoken merges any two adjacent parts whose concatenation is a token, lowest token rank
    first. So every split of a token into two tokens is a merge, with that token's priority:
    merges are listed by the rank of what they make (ties by the parts' ranks). Overlapping
    merges that make the same token cannot be told apart by a list, but they coincide (``aa aa``
    in ``aaaaaa``), and the BPE breaks those ties leftmost as tiktoken does.
    """
    out: list[tuple[bytes, bytes]] = []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        out += sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
    return out


def build_tokenizer_json(ranks: dict[bytes, int]) -> Any:
    """A ``tokenizers.Tokenizer`` equal to Llama 3's: byte-level BPE, the 256 specials, BOS added.

    ``ranks`` are a tiktoken file's (see :func:`pipelines.bpe.read_ranks`); ids equal ranks.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    _check_dense(ranks)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(
        BPE(vocab, [(spell(a), spell(b)) for a, b in merges(ranks)], ignore_merges=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS]
    )
    set_bos_template(tokenizer, len(ranks))
    return tokenizer


def set_bos_template(tokenizer: Any, base_vocab: int) -> None:
    """Prefix every encoded text with ``<|begin_of_text|>``, as Llama 3's tokenizer.json does."""
    from tokenizers import processors

    bos = (BOS, base_vocab)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[bos]
            ),
        ]
    )


def _check_dense(ranks: dict[bytes, int]) -> None:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFormatError("token ranks are not 0..n-1 without gaps")


def tokenizer_config(base_vocab: int, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for a fast Llama 3 Instruct tokenizer, chat template included."""
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for name, i in special_token_ids(base_vocab).items()
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config(base_vocab: int) -> dict[str, Any]:
    """``generation_config.json`` of the Llama 3 Instruct models: stop on any end token."""
    ids = special_token_ids(base_vocab)
    return {
        "bos_token_id": ids[BOS],
        "do_sample": True,
        "eos_token_id": [ids[t] for t in STOP_TOKENS],
        "temperature": 0.6,
        "top_p": 0.9,
    }


def write_hf_tokenizer(ranks: dict[bytes, int], out: Path, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out)
    build_tokenizer_json(ranks).save(str(out / "tokenizer.json"))
    config = tokenizer_config(len(ranks), model_max_length)
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {k: _added(config[k]) for k in ("bos_token", "eos_token")},
    )
    return [out / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]


def _added(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def ranks_from_tokenizer_json(path: Path) -> dict[bytes, int]:
    """The tiktoken ranks a Llama 3 ``tokenizer.json`` holds (its base vocabulary).

    :raises TokenizerFormatError: not a byte-level BPE, ids with gaps, or special tokens that are
        not Llama 3's right above the base vocabulary (the chat format depends on them).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerFormatError(f"{str(path)!r} is not readable JSON: {exc}") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFormatError(
            f"{str(path)!r} holds a {model.get('type')!r} model; Llama 3 is a byte-level BPE"
        )
    ranks = {unspell(text): int(i) for text, i in model["vocab"].items()}
    _check_dense(ranks)
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    want = special_token_ids(len(ranks))
    wrong = [n for n in (BOS, *STOP_TOKENS, "<|start_header_id|>") if added.get(n) != want[n]]
    if wrong:
        raise TokenizerFormatError(
            f"{str(path)!r}: special token(s) {', '.join(wrong)} are not at Llama 3's ids "
            f"(base vocabulary {len(ranks)} + offset); found "
            + ", ".join(f"{n}={added.get(n)}" for n in wrong)
        )
    return ranks


__all__ = [
    "BOS",
    "EOS",
    "PATTERN",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "TOKENIZER_FILES",
    "TokenizerFormatError",
    "build_tokenizer_json",
    "generation_config",
    "merges",
    "ranks_from_tokenizer_json",
    "set_bos_template",
    "special_token_ids",
    "spell",
    "tokenizer_config",
    "unspell",
    "write_hf_tokenizer",
]
