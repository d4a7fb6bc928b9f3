"""The pipeline's configuration: one typed object, read from the environment once, at the edge.

Everything a deployment may want to change about the training task (image, resources, node
placement, secrets, checkpoint format, model cache, how it trains) lives here. Nothing below the
entry points reads ``os.environ``; they take a ``PipelineSettings`` (the train task, which runs
in its own pod, a ``TrainerSettings``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

CheckpointFormat = Literal["meta", "huggingface"]
CHECKPOINT_FORMATS: Final = ("meta", "huggingface")

DEFAULT_BASE_IMAGE: Final = "quay.io/opendatahub/llama-stack-kfp-trainer:latest"
DEFAULT_CACHE_DIR: Final = Path.home() / ".cache" / "kfp-trainer" / "models"
# Where the model-cache PVC is mounted in the training pod (remote mode).
MODEL_CACHE_MOUNT: Final = "/var/cache/kfp-trainer"
# How long the exit task retries its run-finished notice (pipelines/notify.py): longer than
# two PingSource periods, so a handler replaced meanwhile still learns of the run.
NOTIFY_WINDOW_S: Final = 300.0
# OpenTelemetry's variables that the deployment's environment hands on to the pipeline's tasks,
# so their spans reach the same collector under the same sampling. Not OTEL_SERVICE_NAME: the
# tasks name themselves (kfp-trainer-train, kfp-trainer-notify) rather than take the handler's
# name. Not OTEL_EXPORTER_OTLP_HEADERS: it may hold a credential, and the IR is no secret.
TASK_OTEL_VARS: Final = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


class SettingsError(ValueError):
    """A variable is set to something the pipeline cannot use; the message names it."""


_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("", "0", "false", "no", "off")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    if raw.strip().lower() not in _TRUE + _FALSE:
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    return raw.strip().lower() in _TRUE


def _grad_norm(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() == "none":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number > 0, or none") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r}: expected a number > 0, or none")
    return value


@dataclass(frozen=True)
class TrainerSettings:
    """How the train task trains where a llama-stack request has no field for it.

    The train task reads these from its own environment (:meth:`from_env`, at its entry point);
    the pipeline sets that environment from the deployment's values (:meth:`task_env`).
    """

    compile: bool = False  # KFP_TRAINER_COMPILE: torch.compile the model's layers and the loss
    max_grad_norm: float | None = 1.0  # KFP_TRAINER_MAX_GRAD_NORM; "none": no clipping

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerSettings:
        env = os.environ if env is None else env
        return cls(
            compile=_flag(env, "KFP_TRAINER_COMPILE"),
            max_grad_norm=_grad_norm(env, "KFP_TRAINER_MAX_GRAD_NORM", cls.max_grad_norm),
        )

    def task_env(self) -> dict[str, str]:
        """The variables that make the train task's :meth:`from_env` return these settings."""
        return {
            "KFP_TRAINER_COMPILE": "true" if self.compile else "false",
            "KFP_TRAINER_MAX_GRAD_NORM": "none"
            if self.max_grad_norm is None
            else repr(self.max_grad_norm),
        }


def _json(env: Mapping[str, str], name: str, kind: type) -> Any:
    raw = env.get(name, "")
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise SettingsError(f"{name}={raw!r}: expected a JSON {kind.__name__}")
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise SettingsError(f"{name}={value} must be >= 0")
    return value


def _tolerations(value: list[Any], name: str) -> tuple[dict[str, Any], ...]:
    allowed = {"key", "operator", "value", "effect", "toleration_seconds", "tolerationSeconds"}
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise SettingsError(f"{name}[{i}] must be an object like {{'key': ..., 'effect': ...}}")
        unknown = set(item) - allowed
        if unknown:
            raise SettingsError(f"{name}[{i}] has unknown fields {sorted(unknown)}")
        out.append(dict(item))
    return tuple(out)


@dataclass(frozen=True)
class PipelineSettings:
    """Everything the pipeline can be told. Built by :meth:`from_env`; tests build it directly."""

    base_image: str = DEFAULT_BASE_IMAGE  # KFP_TRAINER_BASE_IMAGE
    memory_request: str = ""  # KFP_TRAINER_MEMORY_REQUEST, e.g. "16Gi"
    memory_limit: str = ""  # KFP_TRAINER_MEMORY_LIMIT
    cpu_request: str = ""  # KFP_TRAINER_CPU_REQUEST, e.g. "4"
    accelerator_type: str = "nvidia.com/gpu"  # KFP_TRAINER_ACCELERATOR_TYPE
    accelerator_count: int = 0  # KFP_TRAINER_ACCELERATOR_COUNT; 0 = CPU only
    checkpoint_format: CheckpointFormat = "meta"  # KFP_TRAINER_CHECKPOINT_FORMAT
    node_selector: dict[str, str] = field(default_factory=dict)  # KFP_TRAINER_NODE_SELECTOR
    tolerations: tuple[dict[str, Any], ...] = ()  # KFP_TRAINER_TOLERATIONS
    image_pull_secrets: tuple[str, ...] = ()  # KFP_TRAINER_IMAGE_PULL_SECRETS
    model_cache_pvc: str = ""  # KFP_TRAINER_MODEL_CACHE_PVC
    s3_secret_name: str = "kfp-trainer-s3"  # KFP_TRAINER_S3_SECRET
    s3_endpoint_url: str = ""  # S3_ENDPOINT_URL, passed to the task (MinIO, Ceph); empty: AWS
    cache_dir: Path = DEFAULT_CACHE_DIR  # KFP_TRAINER_CACHE_DIR: extracted-model cache
    # KFP_TRAINER_TOKEN_AUDIENCE: the tasks' posts (run.finished, job.started/progress) carry a
    # bearer token for this audience (the Broker's with Knative's OIDC, or the handler's);
    # empty: no token (pipelines/sa_token.py).
    token_audience: str = ""
    trainer: TrainerSettings = field(default_factory=TrainerSettings)  # KFP_TRAINER_COMPILE, ...
    telemetry_env: dict[str, str] = field(default_factory=dict)  # TASK_OTEL_VARS that are set

    def __post_init__(self) -> None:
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise SettingsError(
                f"checkpoint_format={self.checkpoint_format!r}: expected one of "
                f"{', '.join(CHECKPOINT_FORMATS)}"
            )

    @property
    def task_cache_dir(self) -> str:
        """The compiled pipeline's default model cache: the PVC mount when one is set, else ""
        (a pod-local scratch cache). Local runs pass ``cache_dir`` explicitly."""
        return MODEL_CACHE_MOUNT if self.model_cache_pvc else ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PipelineSettings:
        """Read the environment (or a given mapping, for tests) once, validating as it goes."""
        env = os.environ if env is None else env
        fmt = env.get("KFP_TRAINER_CHECKPOINT_FORMAT", "") or "meta"
        if fmt not in CHECKPOINT_FORMATS:
            raise SettingsError(
                f"KFP_TRAINER_CHECKPOINT_FORMAT={fmt!r}: expected one of "
                f"{', '.join(CHECKPOINT_FORMATS)}"
            )
        selector = _json(env, "KFP_TRAINER_NODE_SELECTOR", dict)
        if not all(isinstance(v, str) for v in selector.values()):
            raise SettingsError("KFP_TRAINER_NODE_SELECTOR: every value must be a string")
        secrets = env.get("KFP_TRAINER_IMAGE_PULL_SECRETS", "")
        cache = env.get("KFP_TRAINER_CACHE_DIR", "")
        return cls(
            base_image=env.get("KFP_TRAINER_BASE_IMAGE", "") or DEFAULT_BASE_IMAGE,
            memory_request=env.get("KFP_TRAINER_MEMORY_REQUEST", ""),
            memory_limit=env.get("KFP_TRAINER_MEMORY_LIMIT", ""),
            cpu_request=env.get("KFP_TRAINER_CPU_REQUEST", ""),
            accelerator_type=env.get("KFP_TRAINER_ACCELERATOR_TYPE", "") or cls.accelerator_type,
            accelerator_count=_count(env, "KFP_TRAINER_ACCELERATOR_COUNT", 0),
            checkpoint_format=fmt,  # type: ignore[arg-type]
            node_selector=selector,
            tolerations=_tolerations(
                _json(env, "KFP_TRAINER_TOLERATIONS", list), "KFP_TRAINER_TOLERATIONS"
            ),
            image_pull_secrets=tuple(s.strip() for s in secrets.split(",") if s.strip()),
            model_cache_pvc=env.get("KFP_TRAINER_MODEL_CACHE_PVC", ""),
            s3_secret_name=env.get("KFP_TRAINER_S3_SECRET", "") or cls.s3_secret_name,
            s3_endpoint_url=env.get("S3_ENDPOINT_URL", ""),
            cache_dir=Path(cache).expanduser() if cache else DEFAULT_CACHE_DIR,
            token_audience=env.get("KFP_TRAINER_TOKEN_AUDIENCE", "").strip(),
            trainer=TrainerSettings.from_env(env),
            telemetry_env={name: env[name] for name in TASK_OTEL_VARS if env.get(name)},
        )


# Every variable read above.
ENV_VARS: Final = (
    "KFP_TRAINER_BASE_IMAGE",
    "KFP_TRAINER_MEMORY_REQUEST",
    "KFP_TRAINER_MEMORY_LIMIT",
    "KFP_TRAINER_CPU_REQUEST",
    "KFP_TRAINER_ACCELERATOR_TYPE",
    "KFP_TRAINER_ACCELERATOR_COUNT",
    "KFP_TRAINER_CHECKPOINT_FORMAT",
    "KFP_TRAINER_NODE_SELECTOR",
    "KFP_TRAINER_TOLERATIONS",
    "KFP_TRAINER_IMAGE_PULL_SECRETS",
    "KFP_TRAINER_MODEL_CACHE_PVC",
    "KFP_TRAINER_S3_SECRET",
    "S3_ENDPOINT_URL",
    "KFP_TRAINER_CACHE_DIR",
    "KFP_TRAINER_TOKEN_AUDIENCE",
    "KFP_TRAINER_COMPILE",
    "KFP_TRAINER_MAX_GRAD_NORM",
)  # and TASK_OTEL_VARS, OpenTelemetry's own (unset: no tracing), which knative/ leaves out

__all__ = [
    "CHECKPOINT_FORMATS",
    "ENV_VARS",
    "CheckpointFormat",
    "PipelineSettings",
    "SettingsError",
    "TASK_OTEL_VARS",
    "TrainerSettings",
]
