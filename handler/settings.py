"""The handler's configuration: one typed object, built from the environment once, at the edge.

Nothing below ``create_app`` reads ``os.environ``; it gets a ``HandlerSettings``. Every variable
here is documented in README.md and provided by knative/ (a test keeps those in step).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, get_args

from pipelines.roots import parse_roots
from pipelines.settings import NOTIFY_WINDOW_S, PipelineSettings

Mode = Literal["local", "remote"]
# How hard the job store pushes a commit to disk before the 200 (handler/README.md: Durability).
DbSync = Literal["normal", "full"]

DEFAULT_STATE_DIR = Path.home() / ".local" / "share" / "kfp-trainer"


class SettingsError(ValueError):
    """A variable is set to something the handler cannot use; the message names it."""


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    """``env[name]`` as an int of at least ``minimum`` (``default`` when unset or empty)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise SettingsError(f"{name}={value} must be > 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


_EXTENSION_NAME: Final = re.compile(r"^[a-z0-9]{1,20}$")
_CORE_ATTRIBUTES: Final = (
    "id",
    "source",
    "type",
    "specversion",
    "subject",
    "time",
    "datacontenttype",
)


def check_ce_overrides(overrides: Mapping[str, str]) -> None:
    """:raises SettingsError: a K_CE_OVERRIDES name that cannot be an extension attribute."""
    bad = [k for k in overrides if not _EXTENSION_NAME.match(k) or k in _CORE_ATTRIBUTES]
    if bad:
        raise SettingsError(
            f"K_CE_OVERRIDES: {', '.join(sorted(set(bad)))} cannot be extension attribute names "
            "(lower-case letters and digits, at most 20, not a core attribute)"
        )


@dataclass(frozen=True)
class RemoteSettings:
    """Where the KFP server and S3 are, for remote mode. Secrets are read, never logged."""

    kfp_host: str = ""  # KFP_HOST; empty: discover from the DSPA below
    kfp_namespace: str = "kubeflow"  # KFP_NAMESPACE
    kfp_experiment: str = "llama-stack-post-training"  # KFP_EXPERIMENT
    dspa_name: str = ""  # KFP_DSPA_NAME: DataSciencePipelinesApplication to discover from
    kfp_token: str = field(default="", repr=False)  # KFP_TOKEN: static bearer token
    sa_token_path: str = ""  # KF_PIPELINES_SA_TOKEN_PATH: in-cluster projected token
    kfp_verify_ssl: bool = True  # KFP_VERIFY_SSL
    # KFP_CA_BUNDLE: PEM file of the CA(s) the KFP server's certificate chains to (OpenShift:
    # the service CA, .../serviceaccount/service-ca.crt); empty: the system's trust store.
    kfp_ca_bundle: str = ""
    s3_endpoint_url: str = ""  # S3_ENDPOINT_URL (MinIO, Ceph, ODF); empty: AWS
    s3_bucket: str = ""  # S3_BUCKET
    s3_prefix: str = "llama-stack-post-training"  # S3_PREFIX
    s3_secret_name: str = "kfp-trainer-s3"  # KFP_TRAINER_S3_SECRET: mounted into the task
    # KFP_TRAINER_NOTIFY_URL: where runs post run.finished (exit task) and job.started /
    # job.progress (train task); empty: K_SINK, the Broker.
    notify_url: str = ""
    notify_window_s: float = NOTIFY_WINDOW_S  # KFP_TRAINER_NOTIFY_WINDOW_S: notice retry window

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RemoteSettings:
        return cls(
            kfp_host=env.get("KFP_HOST", ""),
            kfp_namespace=env.get("KFP_NAMESPACE", cls.kfp_namespace),
            kfp_experiment=env.get("KFP_EXPERIMENT", cls.kfp_experiment),
            dspa_name=env.get("KFP_DSPA_NAME", ""),
            kfp_token=env.get("KFP_TOKEN", ""),
            sa_token_path=env.get("KF_PIPELINES_SA_TOKEN_PATH", ""),
            kfp_verify_ssl=_bool(env, "KFP_VERIFY_SSL", True),
            kfp_ca_bundle=env.get("KFP_CA_BUNDLE", ""),
            s3_endpoint_url=env.get("S3_ENDPOINT_URL", ""),
            s3_bucket=env.get("S3_BUCKET", ""),
            s3_prefix=env.get("S3_PREFIX", cls.s3_prefix),
            s3_secret_name=env.get("KFP_TRAINER_S3_SECRET", cls.s3_secret_name),
            notify_url=env.get("KFP_TRAINER_NOTIFY_URL", ""),
            notify_window_s=_float(env, "KFP_TRAINER_NOTIFY_WINDOW_S", cls.notify_window_s),
        )


# The pod's service-account files, where the handler's own token and the cluster CA are.
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
_SERVICE_ACCOUNT_USER: Final = re.compile(
    r"^system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
)


def _callers(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma list of service-account usernames (``system:serviceaccount:<ns>:<name>``)."""
    callers = tuple(c.strip() for c in env.get(name, "").split(",") if c.strip())
    bad = [c for c in callers if not _SERVICE_ACCOUNT_USER.match(c)]
    if bad:
        raise SettingsError(
            f"{name}: {', '.join(map(repr, bad))} is not a service account's username; "
            "write system:serviceaccount:<namespace>:<name>"
        )
    return callers


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the handler (handler/identity.py): off unless ``KFP_TRAINER_AUTH=true``.

    Each caller list holds service-account usernames and says what they may do; a bearer token
    is checked with the Kubernetes TokenReview API for ``audience``.
    """

    enabled: bool = False  # KFP_TRAINER_AUTH
    audience: str = "kfp-trainer-handler"  # KFP_TRAINER_AUTH_AUDIENCE: what tokens must be for
    api_url: str = "https://kubernetes.default.svc"  # KFP_TRAINER_AUTH_API_URL (TokenReview)
    # KFP_TRAINER_AUTH_TOKEN_PATH: the handler's own token, presented to the Kubernetes API.
    token_path: str = f"{SERVICE_ACCOUNT_DIR}/token"
    ca_path: str = f"{SERVICE_ACCOUNT_DIR}/ca.crt"  # KFP_TRAINER_AUTH_CA_PATH: the cluster CA
    cache_s: float = 10.0  # KFP_TRAINER_AUTH_CACHE_S: how long a review's answer is reused
    timeout_s: float = 5.0  # KFP_TRAINER_AUTH_TIMEOUT_S: per TokenReview request
    # Who may send job.requested and job.cancel.requested (the Triggers' OIDC identities).
    requesters: tuple[str, ...] = ()  # KFP_TRAINER_AUTH_REQUESTERS
    notifiers: tuple[str, ...] = ()  # KFP_TRAINER_AUTH_NOTIFIERS: run.finished
    reconcilers: tuple[str, ...] = ()  # KFP_TRAINER_AUTH_RECONCILERS: the PingSource tick
    readers: tuple[str, ...] = ()  # KFP_TRAINER_AUTH_READERS: GET /jobs, GET /jobs/<job_uuid>
    # KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS: unfinished jobs one caller may have; past it a new
    # job.requested is a 429 (retried by Knative). 0: no limit.
    max_active_runs: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthSettings:
        settings = cls(
            enabled=_bool(env, "KFP_TRAINER_AUTH", False),
            audience=env.get("KFP_TRAINER_AUTH_AUDIENCE", "") or cls.audience,
            api_url=(env.get("KFP_TRAINER_AUTH_API_URL", "") or cls.api_url).rstrip("/"),
            token_path=env.get("KFP_TRAINER_AUTH_TOKEN_PATH", "") or cls.token_path,
            ca_path=env.get("KFP_TRAINER_AUTH_CA_PATH", "") or cls.ca_path,
            cache_s=_float(env, "KFP_TRAINER_AUTH_CACHE_S", cls.cache_s),
            timeout_s=_float(env, "KFP_TRAINER_AUTH_TIMEOUT_S", cls.timeout_s),
            requesters=_callers(env, "KFP_TRAINER_AUTH_REQUESTERS"),
            notifiers=_callers(env, "KFP_TRAINER_AUTH_NOTIFIERS"),
            reconcilers=_callers(env, "KFP_TRAINER_AUTH_RECONCILERS"),
            readers=_callers(env, "KFP_TRAINER_AUTH_READERS"),
            max_active_runs=env_int(env, "KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS", 0, 0),
        )
        if settings.enabled and not settings.api_url.startswith("https://"):
            raise SettingsError(
                f"KFP_TRAINER_AUTH_API_URL={settings.api_url!r}: the Kubernetes API must be "
                "reached over https:// (the handler's own token travels with each review)"
            )
        if settings.cache_s < 0 or settings.timeout_s <= 0:
            raise SettingsError(
                "KFP_TRAINER_AUTH_CACHE_S must be >= 0 and KFP_TRAINER_AUTH_TIMEOUT_S > 0"
            )
        return settings


@dataclass(frozen=True)
class HandlerSettings:
    """Everything the handler deployable can be told. Built by :meth:`from_env`."""

    mode: Mode = "local"  # KFP_TRAINER_MODE
    state_dir: Path = DEFAULT_STATE_DIR  # KFP_TRAINER_STATE_DIR
    db_path: Path | None = None  # KFP_TRAINER_DB; default <state_dir>/handler.sqlite3
    source: str = "/kfp-trainer/handler"  # KFP_TRAINER_SOURCE: ce-source of emitted events
    sink: str = ""  # K_SINK (Knative SinkBinding) or KFP_TRAINER_SINK
    # KFP_TRAINER_SINK_TOKEN_PATH: a bearer token for the sink, sent when the file exists (the
    # SinkBinding mounts one at /oidc/token, for the Broker's audience, when OIDC is on).
    sink_token_path: str = "/oidc/token"
    ce_overrides: dict[str, str] = field(default_factory=dict)  # K_CE_OVERRIDES extensions
    max_body_bytes: int = 1024 * 1024  # KFP_TRAINER_MAX_BODY_BYTES
    local_workers: int = 1  # KFP_TRAINER_LOCAL_WORKERS: jobs trained at once (local mode)
    model_store: str = ""  # KFP_TRAINER_MODEL_STORE: where `model` names resolve to artifacts
    # KFP_TRAINER_DATA_ROOTS: comma-separated directories or s3:// / https:// prefixes requests
    # may name besides the state dir and model store (remote: the bucket/prefix); see
    # pipelines/roots.py.
    data_roots: tuple[str, ...] = ()
    progress_interval_s: float = 2.0  # KFP_TRAINER_PROGRESS_INTERVAL_S: job.progress throttle
    delivery_attempts: int = 8  # KFP_TRAINER_DELIVERY_ATTEMPTS per outbox pass
    delivery_backoff_s: float = 0.5  # KFP_TRAINER_DELIVERY_BACKOFF_S, doubled per attempt
    delivery_backoff_max_s: float = 30.0  # KFP_TRAINER_DELIVERY_BACKOFF_MAX_S
    retry_after_s: int = 5  # KFP_TRAINER_RETRY_AFTER_S: Retry-After on 503
    # KFP_TRAINER_RECONCILE_PERIOD_S: the PingSource's period (knative/pingsource.yaml); a tick
    # re-announces the runs that ended within the last two periods (remote mode).
    reconcile_period_s: float = 120.0
    # KFP_TRAINER_CANCEL_WAIT_S: how long a cancel waits for KFP to say the run is canceled
    # before it answers "cancelling" (remote mode).
    cancel_wait_s: float = 5.0
    log_level: str = "INFO"  # KFP_TRAINER_LOG_LEVEL
    # KFP_TRAINER_BACKEND: a key of handler.backends.BACKENDS or "module:Class"; empty: the mode.
    backend: str = ""
    db_busy_timeout_s: float = (
        5.0  # KFP_TRAINER_DB_BUSY_TIMEOUT_S: wait on a locked store, then 503
    )
    # KFP_TRAINER_DB_SYNC: "normal" (a commit survives the process: WAL written, not fsynced)
    # or "full" (fsync per commit: survives a power loss, if the volume does).
    db_sync: DbSync = "normal"
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    # The pipeline's own settings (pipelines/settings.py), read from the same environment.
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)

    @property
    def database(self) -> Path:
        return self.db_path or self.state_dir / "handler.sqlite3"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HandlerSettings:
        """Read the environment (or a given mapping, for tests) once, validating as it goes."""
        env = os.environ if env is None else env
        mode = env.get("KFP_TRAINER_MODE", "local")
        if mode not in ("local", "remote"):
            raise SettingsError(f"KFP_TRAINER_MODE={mode!r}: expected 'local' or 'remote'")
        overrides_raw = env.get("K_CE_OVERRIDES", "")
        overrides: dict[str, str] = {}
        if overrides_raw:
            try:
                overrides = {
                    str(k): str(v) for k, v in json.loads(overrides_raw)["extensions"].items()
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                raise SettingsError(
                    f'K_CE_OVERRIDES={overrides_raw!r}: expected {{"extensions": {{...}}}}'
                ) from None
        backend = env.get("KFP_TRAINER_BACKEND", "")
        if mode == "remote" and backend:
            raise SettingsError(
                f"KFP_TRAINER_BACKEND={backend!r} applies to local mode only: remote mode runs "
                "every job on KFP and keeps no state of its own"
            )
        check_ce_overrides(overrides)
        db = env.get("KFP_TRAINER_DB", "")
        db_sync = env.get("KFP_TRAINER_DB_SYNC", "") or cls.db_sync
        if db_sync not in get_args(DbSync):
            raise SettingsError(f"KFP_TRAINER_DB_SYNC={db_sync!r}: expected 'normal' or 'full'")
        return cls(
            mode=mode,  # type: ignore[arg-type]
            state_dir=Path(env.get("KFP_TRAINER_STATE_DIR", "") or DEFAULT_STATE_DIR),
            db_path=Path(db) if db else None,
            source=env.get("KFP_TRAINER_SOURCE", "") or cls.source,
            sink=env.get("K_SINK", "") or env.get("KFP_TRAINER_SINK", ""),
            sink_token_path=env.get("KFP_TRAINER_SINK_TOKEN_PATH", "") or cls.sink_token_path,
            ce_overrides=overrides,
            max_body_bytes=env_int(env, "KFP_TRAINER_MAX_BODY_BYTES", cls.max_body_bytes, 1),
            local_workers=env_int(env, "KFP_TRAINER_LOCAL_WORKERS", cls.local_workers, 1),
            model_store=env.get("KFP_TRAINER_MODEL_STORE", ""),
            data_roots=parse_roots(env.get("KFP_TRAINER_DATA_ROOTS", "")),
            progress_interval_s=_float(
                env, "KFP_TRAINER_PROGRESS_INTERVAL_S", cls.progress_interval_s
            ),
            delivery_attempts=env_int(
                env, "KFP_TRAINER_DELIVERY_ATTEMPTS", cls.delivery_attempts, 1
            ),
            delivery_backoff_s=_float(
                env, "KFP_TRAINER_DELIVERY_BACKOFF_S", cls.delivery_backoff_s
            ),
            delivery_backoff_max_s=_float(
                env, "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S", cls.delivery_backoff_max_s
            ),
            retry_after_s=env_int(env, "KFP_TRAINER_RETRY_AFTER_S", cls.retry_after_s, 1),
            reconcile_period_s=_positive(
                env, "KFP_TRAINER_RECONCILE_PERIOD_S", cls.reconcile_period_s
            ),
            cancel_wait_s=_float(env, "KFP_TRAINER_CANCEL_WAIT_S", cls.cancel_wait_s),
            log_level=env.get("KFP_TRAINER_LOG_LEVEL", cls.log_level).upper(),
            backend=backend,
            db_busy_timeout_s=_float(env, "KFP_TRAINER_DB_BUSY_TIMEOUT_S", cls.db_busy_timeout_s),
            db_sync=db_sync,  # type: ignore[arg-type]
            remote=RemoteSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            pipeline=PipelineSettings.from_env(env),
        )


# Every variable read above; knative/ tests check the Service provides what a deployment needs.
ENV_VARS = (
    "KFP_TRAINER_MODE",
    "KFP_TRAINER_STATE_DIR",
    "KFP_TRAINER_DB",
    "KFP_TRAINER_SOURCE",
    "K_SINK",
    "KFP_TRAINER_SINK_TOKEN_PATH",
    "KFP_TRAINER_SINK",
    "K_CE_OVERRIDES",
    "KFP_TRAINER_MAX_BODY_BYTES",
    "KFP_TRAINER_LOCAL_WORKERS",
    "KFP_TRAINER_MODEL_STORE",
    "KFP_TRAINER_DATA_ROOTS",
    "KFP_TRAINER_PROGRESS_INTERVAL_S",
    "KFP_TRAINER_DELIVERY_ATTEMPTS",
    "KFP_TRAINER_DELIVERY_BACKOFF_S",
    "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S",
    "KFP_TRAINER_RETRY_AFTER_S",
    "KFP_TRAINER_RECONCILE_PERIOD_S",
    "KFP_TRAINER_CANCEL_WAIT_S",
    "KFP_TRAINER_LOG_LEVEL",
    "KFP_TRAINER_BACKEND",
    "KFP_TRAINER_DB_BUSY_TIMEOUT_S",
    "KFP_TRAINER_DB_SYNC",
    "KFP_HOST",
    "KFP_NAMESPACE",
    "KFP_EXPERIMENT",
    "KFP_DSPA_NAME",
    "KFP_TOKEN",
    "KF_PIPELINES_SA_TOKEN_PATH",
    "KFP_VERIFY_SSL",
    "KFP_CA_BUNDLE",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_PREFIX",
    "KFP_TRAINER_S3_SECRET",
    "KFP_TRAINER_NOTIFY_URL",
    "KFP_TRAINER_NOTIFY_WINDOW_S",
    "KFP_TRAINER_AUTH",
    "KFP_TRAINER_AUTH_AUDIENCE",
    "KFP_TRAINER_AUTH_API_URL",
    "KFP_TRAINER_AUTH_TOKEN_PATH",
    "KFP_TRAINER_AUTH_CA_PATH",
    "KFP_TRAINER_AUTH_CACHE_S",
    "KFP_TRAINER_AUTH_TIMEOUT_S",
    "KFP_TRAINER_AUTH_REQUESTERS",
    "KFP_TRAINER_AUTH_NOTIFIERS",
    "KFP_TRAINER_AUTH_RECONCILERS",
    "KFP_TRAINER_AUTH_READERS",
    "KFP_TRAINER_AUTH_MAX_ACTIVE_RUNS",
)

__all__ = [
    "ENV_VARS",
    "AuthSettings",
    "DbSync",
    "HandlerSettings",
    "Mode",
    "RemoteSettings",
    "SettingsError",
]
