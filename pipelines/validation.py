"""Config-level checks of a job request that are cheap enough for the handler's ingress.

``check_request`` imports no torch and reads no dataset; it finds every problem the recipe
would otherwise hit only after minutes of staging (unknown model, rank 0, unknown LoRA module,
missing local dataset file, QLoRA/QAT, ...) and names the field in each message. The training
task runs it again, plus the row-level checks in ``pipelines.data``, before it trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from pipelines.models import LORA_ATTN_MODULES, UnknownModelError, lookup
from pipelines.settings import CHECKPOINT_FORMATS

DATA_FORMATS: Final = ("instruct", "dialog")
OPTIMIZERS: Final = ("adam", "adamw", "sgd")
DTYPES: Final = ("bf16", "fp32", "fp16")
URI_SCHEMES: Final = ("", "file", "s3", "https")


class RequestError(ValueError):
    """A request the recipe cannot honour; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def local_path(uri: str) -> Path | None:
    """The local path a URI names, or None when it is remote (s3://, https://)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "":
        return Path(uri)
    return None


def _check_uri(field: str, uri: Any, *, want_file: bool, problems: list[str]) -> None:
    if not isinstance(uri, str) or not uri:
        problems.append(
            f"{field}: must be a non-empty string (a path, file://, s3:// or https:// URI)"
        )
        return
    scheme = urlparse(uri).scheme
    if scheme not in URI_SCHEMES:
        problems.append(
            f"{field}: {uri!r} has unsupported scheme {scheme!r}; use a local path, "
            "file://, s3:// or https://"
        )
        return
    path = local_path(uri)
    if path is None:
        return
    if not path.exists():
        problems.append(f"{field}: file {str(path)!r} does not exist")
    elif want_file and not path.is_file():
        problems.append(f"{field}: {str(path)!r} is not a file")


def _int_field(
    cfg: Mapping[str, Any], key: str, prefix: str, minimum: int, problems: list[str]
) -> None:
    if key in cfg and cfg[key] is not None:
        value = cfg[key]
        if not _is_int(value):
            problems.append(f"{prefix}.{key}: {value!r} is not an integer")
        elif value < minimum:
            problems.append(f"{prefix}.{key}: {value} must be >= {minimum}")


def _check_training(cfg: Any, problems: list[str]) -> None:
    if not isinstance(cfg, Mapping):
        problems.append("training_config: must be an object")
        return
    if "n_epochs" not in cfg:
        problems.append("training_config.n_epochs: is required")
    _int_field(cfg, "n_epochs", "training_config", 1, problems)
    _int_field(cfg, "max_steps_per_epoch", "training_config", 1, problems)
    _int_field(cfg, "gradient_accumulation_steps", "training_config", 1, problems)
    _int_field(cfg, "max_validation_steps", "training_config", 0, problems)
    dtype = cfg.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"training_config.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")

    data = cfg.get("data_config")
    if not isinstance(data, Mapping):
        problems.append(
            "training_config.data_config: is required (batch_size, shuffle, data_format)"
        )
    else:
        prefix = "training_config.data_config"
        if "batch_size" not in data:
            problems.append(f"{prefix}.batch_size: is required")
        _int_field(data, "batch_size", prefix, 1, problems)
        fmt = data.get("data_format")
        if fmt not in DATA_FORMATS:
            problems.append(
                f"{prefix}.data_format: {fmt!r} is not one of {', '.join(DATA_FORMATS)}"
            )
        for key in ("shuffle", "train_on_input", "packed"):
            if data.get(key) is not None and not isinstance(data[key], bool):
                problems.append(f"{prefix}.{key}: {data[key]!r} is not a boolean")
        if data.get("packed") is True:
            problems.append(f"{prefix}.packed: sample packing is not supported; set it to false")

    opt = cfg.get("optimizer_config")
    if opt is not None:
        prefix = "training_config.optimizer_config"
        if not isinstance(opt, Mapping):
            problems.append(f"{prefix}: must be an object")
        else:
            kind = opt.get("optimizer_type", "adamw")
            if kind not in OPTIMIZERS:
                problems.append(
                    f"{prefix}.optimizer_type: {kind!r} is not one of {', '.join(OPTIMIZERS)}"
                )
            lr = opt.get("lr")
            if lr is not None and (not _is_number(lr) or lr <= 0):
                problems.append(f"{prefix}.lr: {lr!r} must be a number > 0")
            wd = opt.get("weight_decay")
            if wd is not None and (not _is_number(wd) or wd < 0):
                problems.append(f"{prefix}.weight_decay: {wd!r} must be a number >= 0")
            _int_field(opt, "num_warmup_steps", prefix, 0, problems)

    eff = cfg.get("efficiency_config")
    if eff is not None and not isinstance(eff, Mapping):
        problems.append("training_config.efficiency_config: must be an object")


def _check_algorithm(algo: Any, model: str | None, problems: list[str]) -> None:
    prefix = "algorithm_config"
    if not isinstance(algo, Mapping):
        problems.append(f"{prefix}: must be an object")
        return
    kind = algo.get("type", "LoRA")
    if kind == "QAT":
        problems.append(
            f"{prefix}.type: 'QAT' (quantization-aware training) is not supported; "
            "only 'LoRA' fine-tuning is"
        )
        return
    if kind != "LoRA":
        problems.append(f"{prefix}.type: {kind!r} is not supported; only 'LoRA' is")
        return
    if algo.get("quantize_base"):
        problems.append(
            f"{prefix}.quantize_base: QLoRA (quantize_base=true) is not supported; set it to false"
        )
    for key in ("rank", "alpha"):
        value = algo.get(key)
        if value is None:
            problems.append(f"{prefix}.{key}: is required")
        elif not _is_int(value):
            problems.append(f"{prefix}.{key}: {value!r} is not an integer")
        elif value < 1:
            problems.append(f"{prefix}.{key}: {value} must be >= 1")
    modules = algo.get("lora_attn_modules")
    if not isinstance(modules, list) or not modules:
        problems.append(
            f"{prefix}.lora_attn_modules: must be a non-empty list of "
            f"{', '.join(LORA_ATTN_MODULES)}"
        )
    else:
        unknown = [m for m in modules if m not in LORA_ATTN_MODULES]
        if unknown:
            problems.append(
                f"{prefix}.lora_attn_modules: unknown module(s) "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(LORA_ATTN_MODULES)}"
            )
    for key in ("apply_lora_to_mlp", "apply_lora_to_output", "use_dora"):
        if algo.get(key) is not None and not isinstance(algo[key], bool):
            problems.append(f"{prefix}.{key}: {algo[key]!r} is not a boolean")
    if algo.get("apply_lora_to_output") and model:
        try:
            spec = lookup(model)
        except UnknownModelError:
            return
        if spec.tied_embeddings:
            problems.append(
                f"{prefix}.apply_lora_to_output: not supported for {spec.name}, whose output "
                "projection is tied to the token embeddings; set it to false"
            )


def check_request(request: Mapping[str, Any]) -> list[str]:
    """Every config-level problem in a job request, each naming its field; [] when fine.

    Example: ``{"model": "nope", ...}`` gives ``["model: unknown model 'nope'; known models:
    Llama3.2-1B-Instruct, ...", ...]``.
    """
    problems: list[str] = []
    if not isinstance(request, Mapping):
        return [f"request must be a JSON object, got {type(request).__name__}"]
    job_uuid = request.get("job_uuid")
    if not isinstance(job_uuid, str) or not job_uuid:
        problems.append("job_uuid: is required (a non-empty string)")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        problems.append("model: is required (a registry name)")
        model = None
    else:
        try:
            lookup(model)
        except UnknownModelError as exc:
            problems.append(f"model: {exc}")
    _check_training(request.get("training_config"), problems)
    _check_algorithm(request.get("algorithm_config"), model, problems)

    for key, required, want_file in (
        ("dataset", True, True),
        ("validation_dataset", False, True),
        ("model_artifact", False, False),
    ):
        ref = request.get(key)
        if ref is None and not required:
            continue
        if not isinstance(ref, Mapping):
            problems.append(
                f"{key}: is required ({{'uri': path to a JSONL file}})"
                if required
                else f"{key}: must be an object with 'uri'"
            )
        else:
            _check_uri(f"{key}.uri", ref.get("uri"), want_file=want_file, problems=problems)
    fmt = request.get("checkpoint_format")
    if fmt is not None and fmt not in CHECKPOINT_FORMATS:
        problems.append(f"checkpoint_format: {fmt!r} is not one of {', '.join(CHECKPOINT_FORMATS)}")
    return problems


def require_valid(request: Mapping[str, Any]) -> None:
    """Raise :class:`RequestError` listing every problem, or return when there is none."""
    problems = check_request(request)
    if problems:
        raise RequestError(problems)


__all__ = [
    "DATA_FORMATS",
    "DTYPES",
    "OPTIMIZERS",
    "RequestError",
    "check_request",
    "local_path",
    "require_valid",
]
