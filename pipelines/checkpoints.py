"""Writing one epoch's checkpoint: the LoRA adapter plus the merged model, Meta or HF format.

Layout of ``<root>/<identifier>/``::

    adapter/adapter_model.pt        LoRA (and DoRA magnitude) weights, torchtune key names
    adapter/adapter_config.json     rank, alpha, target modules, base model
    adapter/adapter_model.safetensors   (huggingface format only: PEFT key names)
    model/consolidated.00.pth + params.json + tokenizer.model        (meta)
    model/model.safetensors + config.json + tokenizer.model          (huggingface)

The directory is written under a temporary name and renamed into place, so a reader (or a
later job) never sees half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtune.models.convert_weights import (
    tune_to_hf,
    tune_to_meta,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

from pipelines.modeling import PARAMS, TOKENIZER, read_params
from pipelines.models import ModelSpec
from pipelines.publish import staged_dir

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def _lora_targets(algo: dict[str, Any]) -> list[str]:
    targets = list(algo["lora_attn_modules"])
    if algo.get("apply_lora_to_mlp"):
        targets += ["w1", "w2", "w3"]
    if algo.get("apply_lora_to_output"):
        targets.append("output")
    return targets


def _hf_config(
    params: dict[str, Any], spec: ModelSpec, model: nn.Module, hidden: int, dtype: str
) -> dict[str, Any]:
    dim = int(params["dim"])
    n_heads = int(params["n_heads"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(params.get("n_kv_heads", n_heads)),
        "num_hidden_layers": int(params["n_layers"]),
        "head_dim": dim // n_heads,
        "vocab_size": int(params["vocab_size"]),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 500000.0)),
        "max_position_embeddings": int(model.max_seq_len),
        "tie_word_embeddings": spec.tied_embeddings,
        "hidden_act": "silu",
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32"),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0 if spec.family == "llama3_2" else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }


def save_checkpoint(
    model: nn.Module,
    *,
    spec: ModelSpec,
    algo: dict[str, Any],
    source_dir: Path,
    root: Path,
    identifier: str,
    checkpoint_format: str,
    dtype: str,
) -> Path:
    """Write ``root/identifier`` (adapter + merged model) atomically; return its path."""
    from safetensors.torch import save_file

    final = root / identifier
    with staged_dir(final) as tmp:
        params = read_params(source_dir)
        n_heads = int(params["n_heads"])
        n_kv = int(params.get("n_kv_heads", n_heads))
        dim = int(params["dim"])
        # A copy: merging adds the LoRA delta in place, and on CPU ``.to("cpu")`` would alias
        # the live weights (the next epoch would train on a base that already holds the delta).
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        adapter_dir = tmp / ADAPTER_DIR
        adapter_dir.mkdir()
        adapter = get_adapter_state_dict(state)
        torch.save(adapter, adapter_dir / "adapter_model.pt")
        config = {
            "r": int(algo["rank"]),
            "lora_alpha": float(algo["alpha"]),
            "target_modules": _lora_targets(algo),
            "use_dora": bool(algo.get("use_dora") or False),
            "base_model": spec.name,
            "peft_type": "LORA",
        }
        if checkpoint_format == "huggingface":
            peft = tune_to_peft_adapter_weights(
                adapter, num_heads=n_heads, num_kv_heads=n_kv, dim=dim
            )
            save_file(
                {k: v.contiguous() for k, v in peft.items()},
                adapter_dir / "adapter_model.safetensors",
            )
            config = {**config, **tune_to_peft_adapter_config(dict(config), spec.name)}
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

        model_dir = tmp / MODEL_DIR
        model_dir.mkdir()
        merged = get_merged_lora_ckpt(
            dict(state), rank=int(algo["rank"]), alpha=float(algo["alpha"])
        )
        if checkpoint_format == "meta":
            torch.save(tune_to_meta(merged), model_dir / "consolidated.00.pth")
            shutil.copy2(source_dir / PARAMS, model_dir / PARAMS)
        else:
            hidden = int(merged["layers.0.mlp.w1.weight"].shape[0])
            hf = tune_to_hf(merged, num_heads=n_heads, num_kv_heads=n_kv, dim=dim)
            save_file({k: v.contiguous() for k, v in hf.items()}, model_dir / "model.safetensors")
            cfg = _hf_config(params, spec, model, hidden, dtype)
            (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copy2(source_dir / TOKENIZER, model_dir / TOKENIZER)
    return final


__all__ = ["ADAPTER_DIR", "MODEL_DIR", "save_checkpoint"]
