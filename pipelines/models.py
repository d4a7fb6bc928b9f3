"""The models this pipeline can fine-tune: an explicit registry, data only (no torch import).

Each entry names the model's Hugging Face repo id and Meta descriptor (the ``llama model
download`` name), its architecture in Meta's ``params.json`` terms, and the torchtune builders
that construct it (with and without LoRA). ``llama3.2-tiny`` is the Llama 3.2 architecture at
toy size, so the whole product runs on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

LORA_ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "output_proj")

# Every Llama 3 tokenizer puts 256 special tokens right after its base vocabulary.
LLAMA3_SPECIAL_SLOTS: Final = 256


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width, computed exactly as Meta's reference model does from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class Architecture:
    """One model's shapes, in the keys of Meta's ``params.json`` (llama-stack's ``arch_args``).

    The FFN size is not stored: Meta's checkpoints (and llama-stack's meta-reference model)
    derive it from ``dim``, ``multiple_of`` and ``ffn_dim_multiplier``; see :attr:`hidden_dim`.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    multiple_of: int
    ffn_dim_multiplier: float | None
    tied_embeddings: bool  # Llama 3.2: the output projection is the embedding matrix
    rope_scale_factor: float  # Hugging Face's rope_scaling.factor: 32 for 3.2, 8 for 3.1
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    use_scaled_rope: bool = True
    max_position_embeddings: int = 131_072

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def params_json(self) -> dict[str, Any]:
        """``params.json`` as Meta ships it (the same keys, no derived ``hidden_dim``)."""
        return {
            "dim": self.dim,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.use_scaled_rope,
            "vocab_size": self.vocab_size,
        }

    def llama3_2_kwargs(self) -> dict[str, Any]:
        """Arguments of torchtune's generic ``llama3_2`` (and ``lora_llama3_2``) builder."""
        return {
            "vocab_size": self.vocab_size,
            "num_layers": self.n_layers,
            "num_heads": self.n_heads,
            "num_kv_heads": self.n_kv_heads,
            "embed_dim": self.dim,
            "max_seq_len": self.max_position_embeddings,
            "intermediate_dim": self.hidden_dim,
            "norm_eps": self.norm_eps,
            "rope_base": int(self.rope_theta),
            "scale_factor": int(self.rope_scale_factor),
        }


LLAMA3_2_1B: Final = Architecture(
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128_256,
    multiple_of=256,
    ffn_dim_multiplier=1.5,
    tied_embeddings=True,
    rope_scale_factor=32.0,
)
LLAMA3_2_3B: Final = Architecture(
    dim=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    vocab_size=128_256,
    multiple_of=256,
    ffn_dim_multiplier=1.0,
    tied_embeddings=True,
    rope_scale_factor=32.0,
)
LLAMA3_1_8B: Final = Architecture(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128_256,
    multiple_of=1024,
    ffn_dim_multiplier=1.3,
    tied_embeddings=False,
    rope_scale_factor=8.0,
)

# The tiny vocabulary is the project's own 320-token BPE (256 bytes + 64 merges, pipelines/bpe.py)
# plus Llama 3's 256 special tokens above it, as in the real 128,000 + 256.
TINY_BASE_VOCAB: Final = 320
TINY: Final = Architecture(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=TINY_BASE_VOCAB + LLAMA3_SPECIAL_SLOTS,
    multiple_of=64,
    ffn_dim_multiplier=1.5,  # -> hidden_dim 256
    tied_embeddings=True,
    rope_scale_factor=32.0,
)


class UnknownModelError(ValueError):
    """The model name is not in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build, load and save one model family member."""

    name: str  # the registry name requests use
    family: str  # "llama3_2" | "llama3_1": torchtune's ModelType and checkpoint conversions
    arch: Architecture
    builder: str  # "module:function" building the base model
    lora_builder: str  # "module:function" building the LoRA model
    hf_repo: str | None = None  # Hugging Face repo id: PEFT's base_model_name_or_path
    meta_descriptor: str | None = None  # `llama model download --model-id` name
    builder_kwargs: dict[str, Any] = field(default_factory=dict)  # for component builders
    max_seq_len: int = 2048  # tokens per training sample (longer ones are truncated)
    aliases: tuple[str, ...] = ()
    # What a request that does not say gets: the values of torchtune 0.5.0's own
    # <model>_lora_single_device.yaml (checkpointing on from 3B up; offloading off everywhere).
    activation_checkpointing: bool = False
    activation_offloading: bool = False

    @property
    def tied_embeddings(self) -> bool:
        return self.arch.tied_embeddings

    @property
    def base_model_name(self) -> str:
        """What an adapter names as its base: the HF repo id, or our own name for the tiny."""
        return self.hf_repo or self.name


MODELS: Final[dict[str, ModelSpec]] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="Llama3.2-1B-Instruct",
            family="llama3_2",
            arch=LLAMA3_2_1B,
            builder="torchtune.models.llama3_2:llama3_2_1b",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2_1b",
            hf_repo="meta-llama/Llama-3.2-1B-Instruct",
            meta_descriptor="Llama3.2-1B-Instruct",
        ),
        ModelSpec(
            name="Llama3.2-3B-Instruct",
            family="llama3_2",
            arch=LLAMA3_2_3B,
            builder="torchtune.models.llama3_2:llama3_2_3b",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2_3b",
            hf_repo="meta-llama/Llama-3.2-3B-Instruct",
            meta_descriptor="Llama3.2-3B-Instruct",
            activation_checkpointing=True,
        ),
        ModelSpec(
            name="Llama3.1-8B-Instruct",
            family="llama3_1",
            arch=LLAMA3_1_8B,
            builder="torchtune.models.llama3_1:llama3_1_8b",
            lora_builder="torchtune.models.llama3_1:lora_llama3_1_8b",
            hf_repo="meta-llama/Llama-3.1-8B-Instruct",
            meta_descriptor="Llama3.1-8B-Instruct",
            activation_checkpointing=True,
        ),
        ModelSpec(
            name="llama3.2-tiny",
            family="llama3_2",
            arch=TINY,
            builder="torchtune.models.llama3_2:llama3_2",
            lora_builder="torchtune.models.llama3_2:lora_llama3_2",
            builder_kwargs=TINY.llama3_2_kwargs(),
            max_seq_len=256,
        ),
    )
}

_BY_ALIAS: Final = {
    alias: spec
    for spec in MODELS.values()
    for alias in (*spec.aliases, *filter(None, (spec.hf_repo, spec.meta_descriptor)))
}


def known_models() -> list[str]:
    """Registry names, in registry order."""
    return list(MODELS)


def lookup(name: str) -> ModelSpec:
    """The spec for a model name, Hugging Face repo id or alias.

    :raises UnknownModelError: naming the model and listing the known ones.
    """
    spec = MODELS.get(name) or _BY_ALIAS.get(name)
    if spec is None:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(known_models())}"
        )
    return spec


__all__ = [
    "LLAMA3_SPECIAL_SLOTS",
    "LORA_ATTN_MODULES",
    "MODELS",
    "TINY",
    "TINY_BASE_VOCAB",
    "Architecture",
    "ModelSpec",
    "UnknownModelError",
    "ffn_hidden_dim",
    "known_models",
    "lookup",
]
