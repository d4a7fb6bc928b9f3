"""Building registry models with torchtune and loading Meta-layout checkpoints into them.

Imports torch and torchtune; only the training task (and the tiny-model generator) load it.
A Meta-layout model directory is what ``llama download`` produces: ``consolidated.00.pth``,
``params.json`` and ``tokenizer.model``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torchtune.models.convert_weights import meta_to_tune
from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS, Llama3Tokenizer

from pipelines.bpe import count_tokens
from pipelines.models import ModelSpec

META_WEIGHTS: Final = "consolidated.00.pth"
PARAMS: Final = "params.json"
TOKENIZER: Final = "tokenizer.model"
_LLAMA3_SPECIAL_BASE: Final = 128_000


class ModelDirError(ValueError):
    """The staged model directory is not a usable Meta-layout checkpoint; names the file."""


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(spec: ModelSpec) -> nn.Module:
    """The base model (no LoRA), randomly initialised, in the current default dtype."""
    return _resolve(spec.builder)(**spec.builder_kwargs)


def build_lora_model(spec: ModelSpec, algo: dict[str, Any]) -> nn.Module:
    """The LoRA model for an ``algorithm_config`` (validated already)."""
    return _resolve(spec.lora_builder)(
        **spec.builder_kwargs,
        lora_attn_modules=list(algo["lora_attn_modules"]),
        apply_lora_to_mlp=bool(algo.get("apply_lora_to_mlp", False)),
        apply_lora_to_output=bool(algo.get("apply_lora_to_output", False)),
        lora_rank=int(algo["rank"]),
        lora_alpha=float(algo["alpha"]),
        use_dora=bool(algo.get("use_dora") or False),
        quantize_base=False,
    )


def special_tokens(base_vocab: int) -> dict[str, int]:
    """Llama 3's special tokens placed right above a base vocabulary of ``base_vocab`` tokens.

    For the real models (128,000 base tokens) this is exactly Llama 3's table; for the tiny
    model the same 257-slot block starts at its own base size.
    """
    return {
        name: base_vocab + (i - _LLAMA3_SPECIAL_BASE) for name, i in LLAMA3_SPECIAL_TOKENS.items()
    }


def load_tokenizer(model_dir: Path, max_seq_len: int) -> Llama3Tokenizer:
    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise ModelDirError(f"model directory {str(model_dir)!r} has no {TOKENIZER}")
    try:
        return Llama3Tokenizer(
            str(path), special_tokens=special_tokens(count_tokens(path)), max_seq_len=max_seq_len
        )
    except Exception as exc:
        raise ModelDirError(f"{str(path)!r} is not a tiktoken BPE file: {exc}") from None


def read_params(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / PARAMS
    if not path.is_file():
        raise ModelDirError(f"model directory {str(model_dir)!r} has no {PARAMS}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelDirError(f"{str(path)!r} is not valid JSON: {exc}") from None


def load_meta_state_dict(model_dir: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Base weights from ``consolidated.00.pth``, converted to torchtune's key names."""
    model_dir = Path(model_dir)
    shards = sorted(model_dir.glob("consolidated.*.pth"))
    if not shards:
        raise ModelDirError(
            f"model directory {str(model_dir)!r} has no {META_WEIGHTS} (Meta layout expected: "
            f"{META_WEIGHTS}, {PARAMS}, {TOKENIZER})"
        )
    if len(shards) > 1:
        raise ModelDirError(
            f"model directory {str(model_dir)!r} holds {len(shards)} shards; only single-file "
            f"Meta checkpoints ({META_WEIGHTS}) are supported"
        )
    try:
        raw = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelDirError(f"cannot load {str(shards[0])!r}: {exc}") from None
    state = meta_to_tune(raw)
    if spec.tied_embeddings:
        state.pop("output.weight", None)
    return state


def load_base_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str = "the model"
) -> None:
    """Load base weights into a LoRA model; anything but missing adapter params is an error."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: another model's checkpoint
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise ModelDirError(
            f"weights in {str(path)!r} are not a {name} checkpoint: {detail}"
        ) from None
    missing = [k for k in result.missing_keys if "lora" not in k and "magnitude" not in k]
    if missing or result.unexpected_keys:
        raise ModelDirError(
            f"weights in {str(path)!r} do not fit {name}: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}"
        )


__all__ = [
    "META_WEIGHTS",
    "PARAMS",
    "TOKENIZER",
    "ModelDirError",
    "build_lora_model",
    "build_model",
    "load_base_weights",
    "load_meta_state_dict",
    "load_tokenizer",
    "read_params",
    "special_tokens",
]
