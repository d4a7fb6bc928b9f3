"""Writing one epoch's checkpoint: the merged model where servers look for it, plus the adapter.

Layout of ``<root>/<identifier>/`` (``Checkpoint.path``), as llama-stack's own recipe lays it::

    consolidated.00.pth, params.json, tokenizer.model           (meta: what `llama model
                                                                 download` gives; Llama 3.2
                                                                 files hold the tied output.weight)
    config.json, generation_config.json, model.safetensors      (huggingface: a complete model
      (or shards + model.safetensors.index.json),                directory for transformers and
      tokenizer.json, tokenizer_config.json (chat template)      vLLM)
    adapter/adapter_model.safetensors, adapter/adapter_config.json   (PEFT: Hugging Face module
                                                                 names, base_model_name_or_path
                                                                 = the base's HF repo id)

So ``checkpoint_dir`` of llama-stack's meta-reference, ``from_pretrained``, ``vllm serve`` and
``PeftModel.from_pretrained(base, path / "adapter")`` all take the path as it is. The merged
weights keep the base checkpoint's dtype. Keys and layouts convert with torchtune's
``convert_weights``. The directory is written under a temporary name and renamed into place
(files 0644), so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torchtune.models.convert_weights import (
    tune_to_hf,
    tune_to_meta,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

from pipelines import hf_tokenizer, layouts, storage, tracing
from pipelines.bpe import write_ranks
from pipelines.modeling import BaseCheckpoint
from pipelines.publish import staged_dir

ADAPTER_DIR: Final = "adapter"
ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
ADAPTER_CONFIG: Final = "adapter_config.json"
CHECKPOINT_FORMATS: Final = ("meta", "huggingface")
MAX_SHARD_BYTES: Final = 5 * 2**30  # save_pretrained's long-standing default shard size
_LICENSE_GLOBS: Final = ("LICENSE*", "USE_POLICY*")  # the Llama license travels with weights


def _lora_targets(algo: dict[str, Any]) -> list[str]:
    targets = list(algo["lora_attn_modules"])
    if algo.get("apply_lora_to_mlp"):
        targets += ["w1", "w2", "w3"]
    if algo.get("apply_lora_to_output"):
        targets.append("output")
    return targets


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _heads(base: BaseCheckpoint) -> dict[str, int]:
    arch = base.spec.arch
    return {
        "num_heads": arch.n_heads,
        "num_kv_heads": arch.n_kv_heads,
        "dim": arch.dim,
        "head_dim": arch.head_dim,
    }


def peft_adapter(
    adapter: dict[str, torch.Tensor], algo: dict[str, Any], base: BaseCheckpoint
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter in PEFT's key names and its ``adapter_config.json``."""
    heads = _heads(base)
    weights = tune_to_peft_adapter_weights(adapter, **heads)
    # convert_weights permutes q/k rows of lora_B for HF's rotary layout but not DoRA's
    # per-row magnitude, which lives in the same rows.
    for key, value in weights.items():
        for proj, n in (("q_proj", heads["num_heads"]), ("k_proj", heads["num_kv_heads"])):
            if key.endswith(f"{proj}.lora_magnitude_vector"):
                hd = heads["head_dim"]
                weights[key] = value.view(n, hd // 2, 2).transpose(1, 2).reshape(-1)
    alpha = float(algo["alpha"])
    config = tune_to_peft_adapter_config(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": int(algo["rank"]),
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": 0.0,
            "target_modules": _lora_targets(algo),
            "use_dora": bool(algo.get("use_dora") or False),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "modules_to_save": None,
        },
        base_model_name_or_path=base.spec.base_model_name,
    )
    return weights, dict(sorted(config.items()))


def merged_state_dict(model: nn.Module, algo: dict[str, Any], dtype: torch.dtype) -> dict:
    """Base + LoRA delta in torchtune's key names, on the CPU, cast to ``dtype``.

    The live model is left as it is: only the weights that take a delta are copied before
    torchtune's in-place merge (on CPU a plain ``.to("cpu")`` would alias them, and the next
    epoch would train on a base that already holds the delta).
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith(".lora_a.weight")]:
        weight = key.removesuffix(".lora_a.weight") + ".weight"
        state[weight] = state[weight].to("cpu", copy=True)
    merged = get_merged_lora_ckpt(state, rank=int(algo["rank"]), alpha=float(algo["alpha"]))
    return {k: v.to("cpu").to(dtype) for k, v in merged.items()}


def _copy_licenses(base: BaseCheckpoint, out: Path) -> None:
    for pattern in _LICENSE_GLOBS:
        for path in base.root.glob(pattern):
            if path.is_file():
                shutil.copy(path, out / path.name)


def write_meta(merged: dict[str, torch.Tensor], base: BaseCheckpoint, out: Path) -> None:
    """consolidated.00.pth (+ tied output.weight), params.json, tokenizer.model."""
    meta = tune_to_meta(merged)
    if base.spec.tied_embeddings:
        meta["output.weight"] = meta["tok_embeddings.weight"]  # as torchtune's Meta checkpointer
    torch.save(meta, out / layouts.META_WEIGHTS)
    source = base.root if base.layout.kind == "meta" else base.layout.original
    if source is not None:
        shutil.copy(source / layouts.PARAMS, out / layouts.PARAMS)
        shutil.copy(source / layouts.TOKENIZER_MODEL, out / layouts.TOKENIZER_MODEL)
    else:
        _write_json(out / layouts.PARAMS, base.spec.arch.params_json())
        write_ranks(out / layouts.TOKENIZER_MODEL, base.ranks)


def _write_hf_weights(hf: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hf.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        _save_safetensors(shards[0], out / layouts.HF_WEIGHTS)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, out / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in hf.values())
    _write_json(
        out / layouts.HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def write_huggingface(merged: dict[str, torch.Tensor], base: BaseCheckpoint, out: Path) -> None:
    """Safetensors (sharded past 5 GiB), config, generation config and tokenizer files."""
    _write_hf_weights(tune_to_hf(merged, **_heads(base)), out)
    dtype = layouts.dtype_name(next(iter(merged.values())).dtype)
    base_vocab = len(base.ranks)
    if base.layout.kind == "huggingface":
        config = dict(base.description)
        for key in ("torch_dtype", "dtype"):  # the weights' dtype, under the key the base used
            if key in config:
                config[key] = layouts.hf_dtype_name(dtype)
        _write_json(out / layouts.HF_CONFIG, config)
        for name in (layouts.HF_GENERATION_CONFIG, *hf_tokenizer.TOKENIZER_FILES):
            if (base.root / name).is_file():
                shutil.copy(base.root / name, out / name)
        _ensure_chat_template(out)
    else:
        ids = hf_tokenizer.special_token_ids(base_vocab)
        eos = [ids[t] for t in hf_tokenizer.STOP_TOKENS]
        config = layouts.hf_config(base.spec.arch, dtype, ids[hf_tokenizer.BOS], eos)
        _write_json(out / layouts.HF_CONFIG, config)
        hf_tokenizer.write_hf_tokenizer(base.ranks, out, base.spec.arch.max_position_embeddings)
    if not (out / layouts.HF_GENERATION_CONFIG).is_file():
        _write_json(out / layouts.HF_GENERATION_CONFIG, hf_tokenizer.generation_config(base_vocab))


def _ensure_chat_template(out: Path) -> None:
    """A base without a chat template (a pretrained, not Instruct, one) gets the one we train on."""
    path = out / "tokenizer_config.json"
    if (out / "chat_template.jinja").is_file() or not path.is_file():
        return
    config = layouts.read_json(path)
    if not config.get("chat_template"):
        from pipelines.chat_format import CHAT_TEMPLATE

        _write_json(path, {**config, "chat_template": CHAT_TEMPLATE})


def save_checkpoint(
    model: nn.Module,
    *,
    base: BaseCheckpoint,
    algo: dict[str, Any],
    root: Path,
    identifier: str,
    checkpoint_format: str,
) -> Path:
    """Write ``root/identifier`` (merged model + ``adapter/``) atomically; return its path.

    A ``save checkpoint`` span (identifier, format, bytes written) covers the write.
    """
    attributes = {"identifier": identifier, "checkpoint_format": checkpoint_format}
    with tracing.span("pipelines", "save checkpoint", attributes=attributes) as span:
        path = _save(model, base, algo, Path(root) / identifier, checkpoint_format)
        span.set_attribute("bytes", storage.size_of(path))
    return path


def _save(
    model: nn.Module,
    base: BaseCheckpoint,
    algo: dict[str, Any],
    final: Path,
    checkpoint_format: str,
) -> Path:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected meta or huggingface")
    if base.dtype is None:
        raise ValueError("the base weights were never loaded (BaseCheckpoint.load_state_dict)")
    with staged_dir(final) as tmp:
        adapter_dir = tmp / ADAPTER_DIR
        adapter_dir.mkdir()
        adapter = get_adapter_state_dict(model.state_dict())
        weights, config = peft_adapter(adapter, algo, base)
        _save_safetensors(weights, adapter_dir / ADAPTER_WEIGHTS)
        _write_json(adapter_dir / ADAPTER_CONFIG, config)
        del adapter, weights

        merged = merged_state_dict(model, algo, base.dtype)
        if checkpoint_format == "meta":
            write_meta(merged, base, tmp)
        else:
            write_huggingface(merged, base, tmp)
        del merged
        _copy_licenses(base, tmp)
    return final


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_FORMATS",
    "merged_state_dict",
    "peft_adapter",
    "save_checkpoint",
    "write_huggingface",
    "write_meta",
]
