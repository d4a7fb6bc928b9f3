"""The registry against the real models: their Hugging Face config.json and Meta params.json
values (copied here as data from the meta-llama repos), llama-stack's own model list, and the
torchtune builders the trainer uses."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pipelines import layouts
from pipelines.models import MODELS, known_models, lookup

_ROPE_3_2 = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
# config.json of meta-llama/<repo> (the fields that fix the architecture).
REAL_CONFIGS = {
    "meta-llama/Llama-3.2-1B-Instruct": {
        **_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": _ROPE_3_2,
    },
    "meta-llama/Llama-3.2-3B-Instruct": {
        **_COMMON,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 24,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_scaling": _ROPE_3_2,
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        **_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_scaling": {**_ROPE_3_2, "factor": 8.0},
    },
}
# params.json of `llama model download --model-id <descriptor>`.
REAL_PARAMS = {
    "Llama3.2-1B-Instruct": {
        "dim": 2048,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 16,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    },
    "Llama3.2-3B-Instruct": {
        "dim": 3072,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 256,
        "n_heads": 24,
        "n_kv_heads": 8,
        "n_layers": 28,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    },
    "Llama3.1-8B-Instruct": {
        "dim": 4096,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 32,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    },
}
REAL = [name for name in known_models() if name != "llama3.2-tiny"]


def test_registry_knows_the_models_and_lists_them_when_unknown() -> None:
    assert known_models() == [
        "Llama3.2-1B-Instruct",
        "Llama3.2-3B-Instruct",
        "Llama3.1-8B-Instruct",
        "llama3.2-tiny",
    ]
    assert lookup("meta-llama/Llama-3.2-1B-Instruct").name == "Llama3.2-1B-Instruct"
    with pytest.raises(ValueError, match=r"unknown model 'Llama2-7B'; known models: Llama3\.2-1B"):
        lookup("Llama2-7B")


@pytest.mark.parametrize("name", REAL)
def test_each_model_names_its_hf_repo_and_meta_descriptor(name: str) -> None:
    spec = lookup(name)
    assert spec.hf_repo in REAL_CONFIGS and spec.meta_descriptor in REAL_PARAMS
    assert spec.base_model_name == spec.hf_repo
    assert lookup(spec.hf_repo) is spec and lookup(spec.meta_descriptor) is spec


@pytest.mark.parametrize("name", REAL)
def test_registry_shapes_equal_the_real_config_json(name: str) -> None:
    spec = lookup(name)
    real = REAL_CONFIGS[spec.hf_repo]
    ours = layouts.hf_config(spec.arch, "bf16", 128000, [128001, 128008, 128009])
    assert {k: ours.get(k) for k in real} == real
    layouts.check_hf_config(real, spec, Path("config.json"))  # accepted as is


@pytest.mark.parametrize("name", REAL)
def test_registry_shapes_equal_the_real_params_json(name: str) -> None:
    spec = lookup(name)
    assert spec.arch.params_json() == REAL_PARAMS[spec.meta_descriptor]
    # The FFN width Meta's code derives from params.json is config.json's intermediate_size.
    assert spec.arch.hidden_dim == REAL_CONFIGS[spec.hf_repo]["intermediate_size"]


@pytest.mark.parametrize("name", REAL)
def test_registry_agrees_with_llama_stacks_model_list(name: str) -> None:
    from llama_stack.models.llama.sku_list import resolve_model

    model = resolve_model(lookup(name).meta_descriptor)
    assert model is not None and model.huggingface_repo == lookup(name).hf_repo
    assert model.arch_args == lookup(name).arch.params_json()


@pytest.mark.parametrize("name", known_models())
def test_torchtune_builders_make_the_registry_shapes(name: str) -> None:
    """Built on the meta device (no memory): every weight shape follows from the registry."""
    import torch

    from pipelines.modeling import build_model

    spec = lookup(name)
    for dotted in (spec.builder, spec.lora_builder):
        module, _, attr = dotted.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), dotted
    with torch.device("meta"):
        model = build_model(spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    a = spec.arch
    assert shapes["tok_embeddings.weight"] == (a.vocab_size, a.dim)
    assert shapes["layers.0.attn.q_proj.weight"] == (a.n_heads * a.head_dim, a.dim)
    assert shapes["layers.0.attn.k_proj.weight"] == (a.n_kv_heads * a.head_dim, a.dim)
    assert shapes["layers.0.mlp.w1.weight"] == (a.hidden_dim, a.dim)
    assert f"layers.{a.n_layers - 1}.mlp.w2.weight" in shapes
    assert f"layers.{a.n_layers}.mlp.w2.weight" not in shapes
    assert ("output.weight" in shapes) is not a.tied_embeddings
    assert MODELS[name] is spec
