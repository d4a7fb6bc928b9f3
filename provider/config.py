"""The provider's configuration: one typed pydantic model, filled from run.yaml.

llama-stack builds this object from the provider's ``config:`` block in run.yaml, after
substituting ``${env.NAME:default}``; that substitution is how every field here is overridden from
the environment. :meth:`KfpTrainerConfig.sample_run_config` yields exactly the block the project's
run.yaml carries, so the variable names are declared once (a test keeps run.yaml equal to it).

S3 credentials are deliberately not fields: boto3 reads them from its usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles), so they never
appear in ``GET /v1/providers`` or in the server's start-up log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from llama_stack.providers.utils.kvstore.config import KVStoreConfig, SqliteKVStoreConfig
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines.roots import Roots, parse_roots

DEFAULT_STATE_DIR = "~/.local/share/kfp-trainer"
MIN_PART_SIZE_MB = 5  # S3's minimum multipart part size (all parts but the last)
# llama-stack's KVStoreConfig union without the default inside its Annotated: under ``| None``
# pydantic warns that default has no effect, a line on the server's console at every start.
OptionalKVStore = Annotated[get_args(KVStoreConfig)[0], Field(discriminator="type")] | None


class S3Config(BaseModel):
    """Where remote mode stages datasets: ``s3://<bucket>/<prefix>/datasets/<job_uuid>/``."""

    endpoint_url: str = Field(
        default="", description="S3 endpoint (MinIO, Ceph, ODF); empty means AWS. S3_ENDPOINT_URL"
    )
    bucket: str = Field(default="", description="Bucket for datasets and artifacts. S3_BUCKET")
    prefix: str = Field(
        default="llama-stack-post-training", description="Key prefix inside the bucket. S3_PREFIX"
    )
    region: str = Field(default="", description="Region name; empty: boto3's default. S3_REGION")
    part_size_mb: int = Field(
        default=8,
        ge=MIN_PART_SIZE_MB,
        description="Multipart upload part size in MiB (S3 minimum 5). KFP_TRAINER_S3_PART_SIZE_MB",
    )


class GpuConfig(BaseModel):
    """What each training run asks for; local mode trains on this machine's CPU or GPU."""

    use_gpu: bool = Field(default=False, description="Train on GPUs. KFP_TRAINER_USE_GPU")
    gpu_count: int = Field(
        default=0, ge=0, le=64, description="GPUs per run. KFP_TRAINER_ACCELERATOR_COUNT"
    )
    accelerator_type: str = Field(
        default="nvidia.com/gpu",
        description="Kubernetes resource name of the accelerator. KFP_TRAINER_ACCELERATOR_TYPE",
    )


class KfpTrainerConfig(BaseModel):
    """Configuration of the ``remote::kfp-torchtune`` post_training provider.

    Args:
        mode: ``local`` runs the handler in this process and trains with KFP's local runner;
            ``remote`` posts events to a Knative broker and trains on a KFP server.
        state_dir: provider state, staged datasets (local) and the in-process handler's files.
        model_store: where ``model`` names resolve to artifacts (a directory or ``s3://...``).
        broker_url: remote: where ``job.requested``/``job.cancel.requested`` are POSTed.
        handler_url: remote: the handler's base URL, asked ``GET /jobs/<job_uuid>`` for status.
        broker_token_file, handler_token_file: remote: where the bearer tokens for those two
            are (projected service-account tokens in the llama-stack pod, one per audience).
    """

    mode: Literal["local", "remote"] = Field(default="local", description="KFP_TRAINER_MODE")
    state_dir: str = Field(default=DEFAULT_STATE_DIR, description="KFP_TRAINER_STATE_DIR")
    model_store: str = Field(
        default="", description="KFP_TRAINER_MODEL_STORE; empty: <state_dir>/models"
    )
    data_roots: str = Field(
        default="",
        description="Comma-separated directories (or s3://, https:// prefixes in remote mode) "
        "the trainer may read datasets from by reference, besides the state dir and model store "
        "(remote: the S3 bucket/prefix). Anything else is staged. KFP_TRAINER_DATA_ROOTS",
    )
    source: str = Field(
        default="/llama-stack/post-training/kfp-torchtune",
        description="ce-source of the events this provider emits. KFP_TRAINER_PROVIDER_SOURCE",
    )
    broker_url: str = Field(default="", description="KFP_TRAINER_BROKER_URL (remote mode)")
    handler_url: str = Field(default="", description="KFP_TRAINER_HANDLER_URL (remote mode)")
    broker_token_file: str = Field(
        default="",
        description="Remote: a file holding the bearer token sent with every event to the broker "
        "(a projected service-account token for the Broker's OIDC audience), re-read for each "
        "request; empty: none. KFP_TRAINER_BROKER_TOKEN_FILE",
    )
    handler_token_file: str = Field(
        default="",
        description="Remote: likewise for GET /jobs on the handler (a token for the handler's "
        "audience, KFP_TRAINER_AUTH_AUDIENCE). KFP_TRAINER_HANDLER_TOKEN_FILE",
    )
    delivery_attempts: int = Field(default=5, ge=1, description="KFP_TRAINER_DELIVERY_ATTEMPTS")
    delivery_backoff_s: float = Field(
        default=0.5, ge=0, description="First retry delay, doubled. KFP_TRAINER_DELIVERY_BACKOFF_S"
    )
    http_timeout_s: float = Field(
        default=10.0, gt=0, description="Per-request HTTP timeout. KFP_TRAINER_HTTP_TIMEOUT_S"
    )
    status_refresh_s: float = Field(
        default=2.0,
        ge=0,
        description="Remote: least seconds between GET /jobs/<id> per job. "
        "KFP_TRAINER_STATUS_REFRESH_S",
    )
    lost_after_s: float = Field(
        default=300.0,
        gt=0,
        description="Remote: a job the handler still does not know after this long says so in "
        "its status (it is never ended on that alone). KFP_TRAINER_LOST_AFTER_S",
    )
    dataset_page_size: int = Field(
        default=100,
        ge=-1,
        description="Rows in the first page staged; pages then grow 4x up to dataset_page_max. "
        "-1: all rows in one iterrows(limit=-1) call (memory grows with the dataset). "
        "KFP_TRAINER_PAGE_SIZE",
    )
    dataset_page_max: int = Field(
        default=100_000,
        ge=1,
        description="Most rows per datasetio iterrows page while a call costs its rows; a call "
        "whose cost is mostly fixed (localfs reads the whole source for each) makes the next "
        "page larger, until its rows outweigh that fixed part. KFP_TRAINER_PAGE_MAX",
    )
    dataset_reader: Literal["auto", "datasetio"] = Field(
        default="auto",
        description="auto: CSV/JSONL/Parquet files by reference or read directly (cells as "
        "text); datasetio: every dataset's rows through datasetio. KFP_TRAINER_DATASET_READER",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json: from the provider's start on, the server writes one JSON object a "
        "line, the format of every other process of this project: llama-stack's, uvicorn's "
        "and the provider's lines (local mode: the handler's and pipelines' too); with "
        "KFP_TRAINER_LOG_FORMAT=json set in the server's environment, llama-stack's start-up "
        "lines as well. text: llama-stack's format for all. KFP_TRAINER_LOG_FORMAT",
    )
    checkpoint_format: Literal["meta", "huggingface"] = Field(
        default="meta", description="KFP_TRAINER_CHECKPOINT_FORMAT"
    )
    base_image: str = Field(
        default="", description="Training image (remote runs). KFP_TRAINER_BASE_IMAGE"
    )
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    s3: S3Config = Field(default_factory=S3Config)
    kvstore: OptionalKVStore = Field(
        default=None, description="Provider job state; default sqlite <state_dir>/provider.db"
    )

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("state_dir must not be empty (KFP_TRAINER_STATE_DIR)")
        return str(Path(value).expanduser())

    @model_validator(mode="after")
    def _remote_needs(self) -> Self:
        if self.mode != "remote":
            return self
        missing = [
            name
            for name, value in (
                ("broker_url (KFP_TRAINER_BROKER_URL)", self.broker_url),
                ("handler_url (KFP_TRAINER_HANDLER_URL)", self.handler_url),
                ("s3.bucket (S3_BUCKET)", self.s3.bucket),
            )
            if not value
        ]
        if missing:
            raise ValueError("mode 'remote' needs " + ", ".join(missing))
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def resolved_model_store(self) -> str:
        return self.model_store or str(self.state_path / "models")

    def roots(self) -> Roots:
        """The places the handler and the trainer may read (the handler checks the same)."""
        data_roots = parse_roots(self.data_roots)
        if self.mode == "remote":
            return Roots.remote(self.s3.bucket, self.s3.prefix, self.model_store, data_roots)
        return Roots.local(self.state_path, self.resolved_model_store, data_roots)

    @property
    def resolved_kvstore(self) -> KVStoreConfig:
        return self.kvstore or SqliteKVStoreConfig(db_path=str(self.state_path / "provider.db"))

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **kwargs: Any) -> dict[str, Any]:
        """The run.yaml ``config:`` block, every field overridable by an environment variable."""
        state = "${env.KFP_TRAINER_STATE_DIR:" + DEFAULT_STATE_DIR + "}"
        return {
            "mode": "${env.KFP_TRAINER_MODE:local}",
            "state_dir": state,
            "model_store": "${env.KFP_TRAINER_MODEL_STORE:}",
            "data_roots": "${env.KFP_TRAINER_DATA_ROOTS:}",
            "source": "${env.KFP_TRAINER_PROVIDER_SOURCE:/llama-stack/post-training/kfp-torchtune}",
            "broker_url": "${env.KFP_TRAINER_BROKER_URL:}",
            "handler_url": "${env.KFP_TRAINER_HANDLER_URL:}",
            "broker_token_file": "${env.KFP_TRAINER_BROKER_TOKEN_FILE:}",
            "handler_token_file": "${env.KFP_TRAINER_HANDLER_TOKEN_FILE:}",
            "delivery_attempts": "${env.KFP_TRAINER_DELIVERY_ATTEMPTS:5}",
            "delivery_backoff_s": "${env.KFP_TRAINER_DELIVERY_BACKOFF_S:0.5}",
            "http_timeout_s": "${env.KFP_TRAINER_HTTP_TIMEOUT_S:10}",
            "status_refresh_s": "${env.KFP_TRAINER_STATUS_REFRESH_S:2}",
            "lost_after_s": "${env.KFP_TRAINER_LOST_AFTER_S:300}",
            "dataset_page_size": "${env.KFP_TRAINER_PAGE_SIZE:100}",
            "dataset_page_max": "${env.KFP_TRAINER_PAGE_MAX:100000}",
            "dataset_reader": "${env.KFP_TRAINER_DATASET_READER:auto}",
            "log_format": "${env.KFP_TRAINER_LOG_FORMAT:json}",
            "checkpoint_format": "${env.KFP_TRAINER_CHECKPOINT_FORMAT:meta}",
            "base_image": "${env.KFP_TRAINER_BASE_IMAGE:}",
            "gpu": {
                "use_gpu": "${env.KFP_TRAINER_USE_GPU:false}",
                "gpu_count": "${env.KFP_TRAINER_ACCELERATOR_COUNT:0}",
                "accelerator_type": "${env.KFP_TRAINER_ACCELERATOR_TYPE:nvidia.com/gpu}",
            },
            "s3": {
                "endpoint_url": "${env.S3_ENDPOINT_URL:}",
                "bucket": "${env.S3_BUCKET:}",
                "prefix": "${env.S3_PREFIX:llama-stack-post-training}",
                "region": "${env.S3_REGION:}",
                "part_size_mb": "${env.KFP_TRAINER_S3_PART_SIZE_MB:8}",
            },
            "kvstore": {"type": "sqlite", "db_path": state + "/provider.db"},
        }
