"""Generate ``llama3.2-tiny``: a random-weight Llama 3.2 checkpoint in either real layout.

Nothing is downloaded: the tokenizer is the project's own small BPE (pipelines/bpe.py) with
Llama 3's 256 special tokens right after it, and the weights come from a seeded generator (the
same seed gives the same weights in both layouts, and byte-identical Meta files). Each layout
holds what the real download holds:

- ``meta`` (``llama model download``): consolidated.00.pth (bf16, Meta key names, the tied
  ``output.weight`` included), params.json (Meta's keys: ``multiple_of``,
  ``ffn_dim_multiplier``), tokenizer.model and checklist.chk;
- ``huggingface`` (``huggingface-cli download``): written by transformers' own
  ``save_pretrained`` (config.json, generation_config.json, model.safetensors or shards with
  model.safetensors.index.json, tokenizer.json, tokenizer_config.json with the chat template).
  This one needs transformers (a dev extra), as the real files need it to be made.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Final

from pipelines import layouts
from pipelines.bpe import write_tiktoken_file
from pipelines.models import LLAMA3_SPECIAL_SLOTS, TINY, TINY_BASE_VOCAB, lookup
from pipelines.publish import staged_dir

NAME: Final = "llama3.2-tiny"
DTYPES: Final = ("bf16", "fp32")


def _tokenizer_model(path: Path) -> Path:
    n_base = write_tiktoken_file(path, TINY_BASE_VOCAB - 256)
    if n_base != TINY_BASE_VOCAB:
        raise RuntimeError(f"tiny tokenizer has {n_base} tokens, expected {TINY_BASE_VOCAB}")
    return path


def tiny_state_dict(seed: int = 0, dtype: str = "bf16") -> dict[str, Any]:
    """The tiny model's weights in torchtune's key names (no ``output.weight``: it is tied)."""
    import torch

    from pipelines.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(lookup(NAME))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return {k: v.to(target).contiguous() for k, v in model.state_dict().items()}


def _write_meta(tmp: Path, state: dict[str, Any]) -> None:
    import torch
    from torchtune.models.convert_weights import tune_to_meta

    _tokenizer_model(tmp / layouts.TOKENIZER_MODEL)
    meta = tune_to_meta(state)
    meta["output.weight"] = meta["tok_embeddings.weight"]  # tied: Meta's files hold it anyway
    torch.save(meta, tmp / layouts.META_WEIGHTS)
    (tmp / layouts.PARAMS).write_text(json.dumps(TINY.params_json(), indent=2) + "\n")
    sums = [
        f"{hashlib.md5((tmp / f).read_bytes()).hexdigest()}  {f}"
        for f in (layouts.META_WEIGHTS, layouts.PARAMS, layouts.TOKENIZER_MODEL)
    ]
    (tmp / "checklist.chk").write_text("\n".join(sums) + "\n")


def _write_huggingface(
    tmp: Path, state: dict[str, Any], dtype: str, max_shard_size: str | None
) -> None:
    import torch
    from torchtune.models.convert_weights import tune_to_hf
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from pipelines import hf_tokenizer
    from pipelines.chat_format import CHAT_TEMPLATE

    ids = hf_tokenizer.special_token_ids(TINY_BASE_VOCAB)
    eos = [ids[t] for t in hf_tokenizer.STOP_TOKENS]
    config = LlamaConfig(**layouts.hf_config(TINY, dtype, ids[hf_tokenizer.BOS], eos))
    model = LlamaForCausalLM(config)
    hf = tune_to_hf(state, num_heads=TINY.n_heads, num_kv_heads=TINY.n_kv_heads, dim=TINY.dim)
    result = model.load_state_dict(hf, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"tiny weights do not fit LlamaForCausalLM: {result}")
    model.tie_weights()
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    model.generation_config = GenerationConfig(**hf_tokenizer.generation_config(TINY_BASE_VOCAB))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp, **kwargs)

    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as scratch:
        tiktoken_file = _tokenizer_model(Path(scratch) / layouts.TOKENIZER_MODEL)
        converted = TikTokenConverter(
            vocab_file=str(tiktoken_file),
            pattern=hf_tokenizer.PATTERN,
            extra_special_tokens=list(hf_tokenizer.SPECIAL_TOKENS),
        ).converted()
    hf_tokenizer.set_bos_template(converted, TINY_BASE_VOCAB)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token=hf_tokenizer.BOS,
        eos_token=hf_tokenizer.EOS,
        model_max_length=TINY.max_position_embeddings,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)


def write_tiny_model(
    out: Path,
    seed: int = 0,
    *,
    layout: str = "meta",
    dtype: str = "bf16",
    max_shard_size: str | None = None,
) -> Path:
    """Write the tiny checkpoint into ``out`` (created; replaced atomically if present).

    ``max_shard_size`` (huggingface only, e.g. ``"100KB"``) splits the weights into shards with
    an index, as the 3B and 8B downloads are.
    """
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(layouts.LAYOUTS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    assert TINY.vocab_size == TINY_BASE_VOCAB + LLAMA3_SPECIAL_SLOTS
    out = Path(out)
    state = tiny_state_dict(seed, dtype)
    with staged_dir(out) as tmp:
        if layout == "meta":
            _write_meta(tmp, state)
        else:
            _write_huggingface(tmp, state, dtype, max_shard_size)
    return out


__all__ = ["DTYPES", "NAME", "tiny_state_dict", "write_tiny_model"]
