"""Building registry models with torchtune and opening a base checkpoint in either real layout.

Imports torch and torchtune; only the training task (and the tiny-model generator) load it.
:func:`open_base` does the cheap part first (layout, model description, tokenizer); weights load
through torchtune's own checkpointers (``FullModelMetaCheckpointer``,
``FullModelHFCheckpointer``), which also convert the key names.
"""

from __future__ import annotations

import gc
import importlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS, Llama3Tokenizer

from pipelines import layouts
from pipelines.bpe import read_ranks, write_ranks
from pipelines.hf_tokenizer import TokenizerFormatError, ranks_from_tokenizer_json
from pipelines.layouts import Layout, ModelDirError
from pipelines.models import LLAMA3_SPECIAL_SLOTS, ModelSpec

_LLAMA3_SPECIAL_BASE: Final = 128_000
# torchtune's checkpointer ModelType per registry family.
_MODEL_TYPES: Final = {"llama3_2": "LLAMA3_2", "llama3_1": "LLAMA3"}


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
    """torchtune's Llama 3 special-token table placed right above ``base_vocab`` tokens.

    For the real models (128,000 base tokens) this is exactly torchtune's table; for the tiny
    model the same block starts at its own base size.
    """
    return {
        name: base_vocab + (i - _LLAMA3_SPECIAL_BASE) for name, i in LLAMA3_SPECIAL_TOKENS.items()
    }


def tokenizer_from_ranks(ranks: dict[bytes, int], max_seq_len: int) -> Llama3Tokenizer:
    """torchtune's Llama 3 tokenizer over a tiktoken vocabulary held in memory."""
    with tempfile.TemporaryDirectory(prefix="kfp-trainer-tok-") as tmp:
        path = Path(tmp) / layouts.TOKENIZER_MODEL
        write_ranks(path, ranks)
        return Llama3Tokenizer(
            str(path), special_tokens=special_tokens(len(ranks)), max_seq_len=max_seq_len
        )


@dataclass
class BaseCheckpoint:
    """An opened base model: layout, description (params or config), tokenizer vocabulary.

    Weights are read only by :meth:`load_state_dict`, after every cheap check has passed.
    """

    spec: ModelSpec
    layout: Layout
    description: dict[str, Any]  # params.json (meta) or config.json (huggingface)
    ranks: dict[bytes, int]  # the tiktoken vocabulary (tokenizer.model, or from tokenizer.json)
    dtype: torch.dtype | None = None  # the weights' dtype, known once loaded

    @property
    def root(self) -> Path:
        return self.layout.root

    def tokenizer(self, max_seq_len: int) -> Llama3Tokenizer:
        return tokenizer_from_ranks(self.ranks, max_seq_len)

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """Base weights in torchtune's key names (tied ``output.weight`` dropped).

        :raises ModelDirError: unreadable weights or keys that are not this model's.
        """
        from torchtune.training import MODEL_KEY
        from torchtune.training.checkpointing import (
            FullModelHFCheckpointer,
            FullModelMetaCheckpointer,
        )

        kind = self.layout.kind
        files = list(self.layout.weight_files)
        scratch = Path(tempfile.mkdtemp(prefix="kfp-trainer-ckpt-"))
        try:
            if kind == "meta" and self.spec.tied_embeddings:
                _require_output_weight(self.root / files[0])
            checkpointer_cls = (
                FullModelHFCheckpointer if kind == "huggingface" else FullModelMetaCheckpointer
            )
            checkpointer = checkpointer_cls(
                checkpoint_dir=str(self.root),
                checkpoint_files=files,
                model_type=_MODEL_TYPES[self.spec.family],
                output_dir=str(scratch),
            )
            # The HF checkpointer runs gc.collect() after every shard: ~0.7 s each over
            # torch's object graph. Frozen objects are not scanned; nothing here is garbage.
            frozen_before = gc.get_freeze_count()
            gc.freeze()
            try:
                state = checkpointer.load_checkpoint()[MODEL_KEY]
            finally:
                if not frozen_before:
                    gc.unfreeze()
        except ModelDirError:
            raise
        except Exception as exc:
            raise ModelDirError(
                f"cannot load the {kind} weights in {str(self.root)!r} "
                f"({', '.join(files)}): {type(exc).__name__}: {exc}"
            ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if self.spec.tied_embeddings:
            state.pop("output.weight", None)  # a tied copy some HF exports keep as lm_head
        embeddings = state.get("tok_embeddings.weight")
        self.dtype = embeddings.dtype if embeddings is not None else None
        return state


def _require_output_weight(path: Path) -> None:
    """Real Meta Llama 3.2 files hold the tied ``output.weight``; say so when one does not."""
    keys = torch.load(path, map_location="meta", weights_only=True, mmap=True).keys()
    if "output.weight" not in keys:
        raise ModelDirError(
            f"{str(path)!r} has no output.weight; Meta's Llama 3.2 checkpoints hold the tied "
            "copy of tok_embeddings.weight (llama-stack's meta-reference loads it strictly)"
        )


def _ranks(layout: Layout) -> dict[bytes, int]:
    original = layout.original
    if layout.kind == "meta" or original is not None:
        path = (original or layout.root) / layouts.TOKENIZER_MODEL
        if not path.is_file():
            raise ModelDirError(f"model directory {str(layout.root)!r} has no {path.name}")
        try:
            return read_ranks(path)
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"{str(path)!r} is not a tiktoken BPE file: {exc}") from None
    path = layout.root / layouts.HF_TOKENIZER
    if not path.is_file():
        raise ModelDirError(
            f"model directory {str(layout.root)!r} has no {layouts.HF_TOKENIZER} (nor "
            f"{layouts.ORIGINAL}/{layouts.TOKENIZER_MODEL})"
        )
    try:
        return ranks_from_tokenizer_json(path)
    except TokenizerFormatError as exc:
        raise ModelDirError(str(exc)) from None


def open_base(model_dir: Path, spec: ModelSpec) -> BaseCheckpoint:
    """Detect the layout, check it describes ``spec`` and read its tokenizer; no weights yet.

    :raises ModelDirError: naming the file and what is wrong with it.
    """
    layout = layouts.detect(Path(model_dir))
    description = layouts.check(layout, spec)
    ranks = _ranks(layout)
    if len(ranks) + LLAMA3_SPECIAL_SLOTS != spec.arch.vocab_size:
        raise ModelDirError(
            f"the tokenizer in {str(layout.root)!r} has {len(ranks)} base tokens; {spec.name} "
            f"has {spec.arch.vocab_size - LLAMA3_SPECIAL_SLOTS} "
            f"(+ {LLAMA3_SPECIAL_SLOTS} special tokens)"
        )
    return BaseCheckpoint(spec=spec, layout=layout, description=description, ranks=ranks)


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
    "BaseCheckpoint",
    "ModelDirError",
    "build_lora_model",
    "build_model",
    "load_base_weights",
    "open_base",
    "special_tokens",
    "tokenizer_from_ranks",
]
