"""The two real on-disk layouts of a Llama checkpoint, told apart by content and checked
against the registry before any weight is read.

- **meta** (``llama model download``): ``consolidated.00.pth``, ``params.json``,
  ``tokenizer.model`` (tiktoken).
- **huggingface** (``huggingface-cli download``, model registries, OCI model cars):
  ``config.json``, ``model.safetensors`` or shards named by ``model.safetensors.index.json``,
  ``tokenizer.json`` + ``tokenizer_config.json``, often ``generation_config.json`` and an
  ``original/`` folder with the Meta files.

No torch here: this reads JSON and file names only, so a bad model fails in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pipelines.models import Architecture, ModelSpec, ffn_hidden_dim

LayoutKind = Literal["meta", "huggingface"]
LAYOUTS: Final = ("meta", "huggingface")

META_WEIGHTS: Final = "consolidated.00.pth"
PARAMS: Final = "params.json"
TOKENIZER_MODEL: Final = "tokenizer.model"
HF_CONFIG: Final = "config.json"
HF_GENERATION_CONFIG: Final = "generation_config.json"
HF_WEIGHTS: Final = "model.safetensors"
HF_INDEX: Final = "model.safetensors.index.json"
HF_TOKENIZER: Final = "tokenizer.json"
ORIGINAL: Final = "original"  # where Hugging Face repos keep the Meta files
HF_ARCHITECTURE: Final = "LlamaForCausalLM"

_DTYPES: Final = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class ModelDirError(ValueError):
    """The model directory is not a usable checkpoint of the requested model; names the file."""


@dataclass(frozen=True)
class Layout:
    """A detected checkpoint: its kind, root directory and weight files (relative names)."""

    kind: LayoutKind
    root: Path
    weight_files: tuple[str, ...]

    @property
    def original(self) -> Path | None:
        """The Meta files a Hugging Face download carries in ``original/``, if complete."""
        folder = self.root / ORIGINAL
        if self.kind == "huggingface" and all(
            (folder / f).is_file() for f in (PARAMS, TOKENIZER_MODEL)
        ):
            return folder
        return None


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a :class:`ModelDirError` naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelDirError(f"{str(path)!r} must hold a JSON object")
    return value


def _hf_weight_files(root: Path) -> tuple[str, ...]:
    index = root / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"{str(index)!r} has no weight_map")
        files = tuple(sorted(set(weight_map.values())))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ModelDirError(
                f"{str(index)!r} names {', '.join(missing)}, missing from {str(root)!r}"
            )
        return files
    if (root / HF_WEIGHTS).is_file():
        return (HF_WEIGHTS,)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if len(shards) == 1:
        return (shards[0],)
    if shards:
        raise ModelDirError(
            f"model directory {str(root)!r} holds {len(shards)} safetensors shards but no "
            f"{HF_INDEX} saying which tensor lives where"
        )
    if any(root.glob("pytorch_model*.bin")):
        raise ModelDirError(
            f"model directory {str(root)!r} holds pytorch_model*.bin weights; only safetensors "
            "Hugging Face checkpoints are supported"
        )
    raise ModelDirError(f"model directory {str(root)!r} has {HF_CONFIG} but no safetensors weights")


def _meta_weight_files(root: Path) -> tuple[str, ...]:
    shards = sorted(p.name for p in root.glob("consolidated.*.pth"))
    if len(shards) > 1:
        raise ModelDirError(
            f"model directory {str(root)!r} holds {len(shards)} shards; only single-file "
            f"Meta checkpoints ({META_WEIGHTS}) are supported"
        )
    return tuple(shards)


def detect(model_dir: Path) -> Layout:
    """Which layout ``model_dir`` holds, by its files (names and JSON content, not weights).

    A directory with only ``original/`` (a Hugging Face download of the Meta files alone) is
    read as the Meta checkpoint inside it.

    :raises ModelDirError: neither layout, or an incomplete one, naming what is missing.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model directory {str(root)!r} does not exist")
    if (root / HF_CONFIG).is_file():
        return Layout("huggingface", root, _hf_weight_files(root))
    meta = _meta_weight_files(root)
    if meta or (root / PARAMS).is_file():
        if not meta:
            raise ModelDirError(
                f"model directory {str(root)!r} has {PARAMS} but no {META_WEIGHTS} (Meta layout: "
                f"{META_WEIGHTS}, {PARAMS}, {TOKENIZER_MODEL})"
            )
        if not (root / PARAMS).is_file():
            raise ModelDirError(f"model directory {str(root)!r} has {meta[0]} but no {PARAMS}")
        return Layout("meta", root, meta)
    if (root / ORIGINAL).is_dir() and any((root / ORIGINAL).glob("consolidated.*.pth")):
        return detect(root / ORIGINAL)
    raise ModelDirError(
        f"model directory {str(root)!r} is neither a Meta checkpoint ({META_WEIGHTS}, {PARAMS}, "
        f"{TOKENIZER_MODEL}) nor a Hugging Face one ({HF_CONFIG}, {HF_WEIGHTS} or {HF_INDEX} "
        f"with its shards, {HF_TOKENIZER}); it holds: {_listing(root)}"
    )


def _differences(found: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k} {found.get(k)!r} (expected {v!r})" for k, v in want.items() if found.get(k) != v]


def hf_shapes(arch: Architecture) -> dict[str, Any]:
    """The ``config.json`` fields that fix a Llama model's shapes."""
    return {
        "hidden_size": arch.dim,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads,
        "intermediate_size": arch.hidden_dim,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tied_embeddings,
    }


def check_hf_config(config: dict[str, Any], spec: ModelSpec, path: Path) -> None:
    """``config.json`` describes the requested model: a Llama, with the registry's shapes.

    :raises ModelDirError: saying which architecture or fields differ and what was expected.
    """
    found_arch = config.get("architectures") or [config.get("model_type")]
    if HF_ARCHITECTURE not in found_arch:
        raise ModelDirError(
            f"{str(path)!r} describes a {'/'.join(map(str, found_arch))} model, but the request "
            f"asks for {spec.name}, a {HF_ARCHITECTURE}; give model_artifact a {spec.name} "
            "checkpoint or request the model this checkpoint is"
        )
    config = {"tie_word_embeddings": False, **config}  # transformers' default when absent
    head_dim = config.get("head_dim")
    diff = _differences(config, hf_shapes(spec.arch))
    if head_dim is not None and head_dim != spec.arch.head_dim:
        diff.append(f"head_dim {head_dim!r} (expected {spec.arch.head_dim!r})")
    if diff:
        raise ModelDirError(
            f"{str(path)!r} is a {HF_ARCHITECTURE} but not {spec.name}: " + ", ".join(diff)
        )


def check_params(params: dict[str, Any], spec: ModelSpec, path: Path) -> None:
    """``params.json`` describes the requested model, its FFN width computed as Meta's code does.

    :raises ModelDirError: naming each field that differs.
    """
    arch = spec.arch
    want = {
        k: v
        for k, v in arch.params_json().items()
        if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
    }
    found = {"n_kv_heads": params.get("n_heads"), **params}
    diff = _differences(found, want)
    try:
        hidden: int | None = ffn_hidden_dim(
            int(params["dim"]), int(params["multiple_of"]), params.get("ffn_dim_multiplier")
        )
    except (KeyError, TypeError, ValueError):
        hidden = None
    if hidden != arch.hidden_dim:
        diff.append(
            f"FFN width {hidden} from multiple_of {params.get('multiple_of')!r} and "
            f"ffn_dim_multiplier {params.get('ffn_dim_multiplier')!r} (expected {arch.hidden_dim}: "
            f"multiple_of {arch.multiple_of}, ffn_dim_multiplier {arch.ffn_dim_multiplier})"
        )
    if diff:
        raise ModelDirError(f"{str(path)!r} does not describe {spec.name}: " + ", ".join(diff))


def check(layout: Layout, spec: ModelSpec) -> dict[str, Any]:
    """Check the layout's model description against ``spec``; return it (config or params)."""
    if layout.kind == "huggingface":
        config = read_json(layout.root / HF_CONFIG)
        check_hf_config(config, spec, layout.root / HF_CONFIG)
        return config
    params = read_json(layout.root / PARAMS)
    check_params(params, spec, layout.root / PARAMS)
    return params


def dtype_name(torch_dtype: Any) -> str:
    """``bf16``/``fp16``/``fp32`` for a torch dtype (or its config.json spelling)."""
    return _DTYPES.get(str(torch_dtype).removeprefix("torch."), "fp32")


def hf_dtype_name(dtype: str) -> str:
    """config.json's spelling (``bfloat16``, ...) of ``bf16``/``fp16``/``fp32``."""
    return {v: k for k, v in _DTYPES.items()}[dtype]


def hf_config(arch: Architecture, dtype: str, bos_token_id: int, eos_token_ids: list[int]) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with ``arch``'s shapes (as Meta's HF repos)."""
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_ids,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": arch.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": arch.norm_eps,
        "rope_scaling": None,
        "rope_theta": arch.rope_theta,
        "torch_dtype": hf_dtype_name(dtype),
        "use_cache": True,
        **hf_shapes(arch),
    }
    if arch.use_scaled_rope:
        config["rope_scaling"] = {
            "factor": arch.rope_scale_factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    return dict(sorted(config.items()))


__all__ = [
    "HF_ARCHITECTURE",
    "HF_CONFIG",
    "HF_GENERATION_CONFIG",
    "HF_INDEX",
    "HF_TOKENIZER",
    "HF_WEIGHTS",
    "LAYOUTS",
    "META_WEIGHTS",
    "ORIGINAL",
    "PARAMS",
    "TOKENIZER_MODEL",
    "Layout",
    "LayoutKind",
    "ModelDirError",
    "check",
    "check_hf_config",
    "check_params",
    "detect",
    "dtype_name",
    "hf_config",
    "hf_dtype_name",
    "hf_shapes",
    "read_json",
]
