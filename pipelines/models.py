"""The models this pipeline can fine-tune: an explicit registry, data only (no torch import).

Each entry names the torchtune builders that construct the model (with and without LoRA) and
the facts the recipe and the request validation need. ``llama3.2-tiny`` is the Llama 3.2
architecture at toy size, so the whole product runs on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

LORA_ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "output_proj")

# Tiny dimensions: the vocabulary is the project's own 320-token BPE (256 bytes + 64 merges)
# plus Llama 3's 257 special-token slots above it (see pipelines/tiny.py).
TINY_BASE_VOCAB: Final = 320
TINY_DIMS: Final[dict[str, Any]] = {
    "vocab_size": TINY_BASE_VOCAB + 257,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "max_seq_len": 512,
    "intermediate_dim": 128,
    "norm_eps": 1e-5,
    "rope_base": 500_000,
    "scale_factor": 32,
}


class UnknownModelError(ValueError):
    """The model name is not in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build, load and save one model family member."""

    name: str
    family: str  # "llama3_2" | "llama3_1": selects checkpoint conversions
    builder: str  # "module:function" building the base model
    lora_builder: str  # "module:function" building the LoRA model
    builder_kwargs: dict[str, Any] = field(default_factory=dict)  # for component builders
    tied_embeddings: bool = False  # output projection shares the embedding weights
    max_seq_len: int = 2048  # tokens per training sample (longer ones are truncated)
    aliases: tuple[str, ...] = ()


MODELS: Final[dict[str, ModelSpec]] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="Llama3.2-1B-Instruct",
            family="llama3_2",
            builder="torchtune.models.llama3_2:llama3_2_1b",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2_1b",
            tied_embeddings=True,
            aliases=("meta-llama/Llama-3.2-1B-Instruct",),
        ),
        ModelSpec(
            name="Llama3.2-3B-Instruct",
            family="llama3_2",
            builder="torchtune.models.llama3_2:llama3_2_3b",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2_3b",
            tied_embeddings=True,
            aliases=("meta-llama/Llama-3.2-3B-Instruct",),
        ),
        ModelSpec(
            name="Llama3.1-8B-Instruct",
            family="llama3_1",
            builder="torchtune.models.llama3_1:llama3_1_8b",
            lora_builder="torchtune.models.llama3_1:lora_llama3_1_8b",
            tied_embeddings=False,
            aliases=("meta-llama/Llama-3.1-8B-Instruct",),
        ),
        ModelSpec(
            name="llama3.2-tiny",
            family="llama3_2",
            builder="torchtune.models.llama3_2:llama3_2",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2",
            builder_kwargs=TINY_DIMS,
            tied_embeddings=True,
            max_seq_len=256,
        ),
    )
}

_BY_ALIAS: Final = {alias: spec for spec in MODELS.values() for alias in spec.aliases}


def known_models() -> list[str]:
    """Registry names, in registry order."""
    return list(MODELS)


def lookup(name: str) -> ModelSpec:
    """The spec for a model name or alias.

    :raises UnknownModelError: naming the model and listing the known ones.
    """
    spec = MODELS.get(name) or _BY_ALIAS.get(name)
    if spec is None:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(known_models())}"
        )
    return spec


__all__ = [
    "LORA_ATTN_MODULES",
    "MODELS",
    "TINY_DIMS",
    "ModelSpec",
    "UnknownModelError",
    "known_models",
    "lookup",
]
