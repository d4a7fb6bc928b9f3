"""The KFP pipeline ``llama-stack-lora-finetune``: one definition for local and remote runs.

Shape: a ``dsl.ExitHandler`` whose exit task ``notify`` posts a run-finished notice, around
importers for the model and the dataset(s) (so they are recorded as artifacts) and the
training task ``train``. The train task takes the artifacts' URIs and fetches them itself:
locally they are paths (the KFP local importer maps s3:// to a path that does not exist), and
remotely the task pulls s3:// URIs with its own credentials into the model-cache PVC, instead
of having KFP's launcher copy a multi-GB model into every pod. Datasets travel as JSONL files,
never in the spec, so there is no row limit.

``pipeline_arguments`` turns a job request into the run's parameters; the same dict serves
local runs and ``create_run_from_pipeline_package``. The job's trace context travels as the
``traceparent``/``tracestate`` parameters, so both tasks continue the job's trace. Both tasks
present a bearer token for ``token_audience`` with what they post, when it is set.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's real types.

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from pipelines.settings import NOTIFY_WINDOW_S, PipelineSettings
from pipelines.tracing import TRACE_KEYS

PIPELINE_NAME: Final = "llama-stack-lora-finetune"
TRAIN_TASK: Final = "train"
NOTIFY_TASK: Final = "notify"
# Request fields that travel as their own parameters (URIs), not inside request_json.
_URI_FIELDS: Final = ("dataset", "validation_dataset", "model_artifact")
# Where the handler keeps the job's W3C trace context in a request; each key is a parameter.
TRACE_FIELD: Final = "trace"
# Where the handler puts the roots the train task may read (pipelines/roots.py); a parameter.
ROOTS_FIELD: Final = "allowed_roots"


def pipeline_arguments(
    request: Mapping[str, Any],
    *,
    progress_path: str = "",
    result_uri: str = "",
    notify_url: str = "",
    notify_event_type: str = "",
    notify_window_s: float | None = None,
    request_digest: str = "",
    task_events: str = "",
    token_audience: str = "",
    caller: str = "",
) -> dict[str, Any]:
    """The run parameters for a job request (``model_artifact.uri`` must be resolved).

    ``request_digest`` (the job.requested content digest) rides along unused by the tasks: KFP
    keeps it with the run, so a redelivered request can be compared with the one that made
    it. ``task_events`` is the train task's pipelines.task_events.TaskEventsConfig as JSON.
    ``token_audience`` overrides the compiled default (PipelineSettings.token_audience).
    ``caller`` (who requested the job, when the handler checks callers) rides along unused too:
    the handler counts a caller's unfinished runs by it.

    :raises ValueError: naming a missing field.
    """
    for field in ("job_uuid", "model", "training_config", "algorithm_config"):
        if field not in request:
            raise ValueError(f"request has no {field!r}")
    model_uri = (request.get("model_artifact") or {}).get("uri")
    if not model_uri:
        raise ValueError(
            "request has no model_artifact.uri; resolve it with "
            "pipelines.staging.resolve_model_uri first"
        )
    dataset_uri = (request.get("dataset") or {}).get("uri")
    if not dataset_uri:
        raise ValueError("request has no dataset.uri")
    # URIs travel as their own parameters; what else the refs say (rows, sha256) stays, so
    # the train task can check the files it fetched against it.
    config = {
        k: ({f: x for f, x in v.items() if f != "uri"} if k in _URI_FIELDS else v)
        for k, v in request.items()
        if k not in (TRACE_FIELD, ROOTS_FIELD)
    }
    args: dict[str, Any] = {
        "job_uuid": request["job_uuid"],
        "request_json": json.dumps(config, sort_keys=True),
        "model_uri": model_uri,
        "dataset_uri": dataset_uri,
        "validation_dataset_uri": (request.get("validation_dataset") or {}).get("uri", ""),
        "progress_path": progress_path,
        "result_uri": result_uri,
        "notify_url": notify_url,
        "notify_event_type": notify_event_type,
        "request_digest": request_digest,
        "task_events": task_events,
    }
    if notify_window_s is not None:
        args["notify_window_s"] = float(notify_window_s)
    if token_audience:
        args["token_audience"] = token_audience
    if caller:
        args["caller"] = caller
    if request.get("checkpoint_format"):
        args["checkpoint_format"] = request["checkpoint_format"]
    trace = request.get(TRACE_FIELD) or {}
    args.update({k: str(trace[k]) for k in TRACE_KEYS if trace.get(k)})
    if request.get(ROOTS_FIELD) is not None:
        args["allowed_roots"] = json.dumps(list(request[ROOTS_FIELD]))
    return args


def _pod_identity_env(task: Any) -> None:
    """The pod's namespace and service account as env (the downward API): what the task needs
    to ask the Kubernetes API for a token (pipelines/sa_token.py; kfp-kubernetes 2.17 cannot
    mount a projected service-account token)."""
    from kfp import kubernetes

    from pipelines.sa_token import POD_NAMESPACE_ENV, POD_SERVICE_ACCOUNT_ENV

    kubernetes.use_field_path_as_env(task, POD_NAMESPACE_ENV, "metadata.namespace")
    kubernetes.use_field_path_as_env(task, POD_SERVICE_ACCOUNT_ENV, "spec.serviceAccountName")


def _configure_train(task: Any, settings: PipelineSettings) -> None:
    """Resources, placement, secrets and volumes of the train task, all from settings."""
    from kfp import kubernetes

    task.set_caching_options(False)
    if settings.memory_request:
        task.set_memory_request(settings.memory_request)
    if settings.memory_limit:
        task.set_memory_limit(settings.memory_limit)
    if settings.cpu_request:
        task.set_cpu_request(settings.cpu_request)
    if settings.accelerator_count > 0:
        task.set_accelerator_type(settings.accelerator_type)
        task.set_accelerator_limit(settings.accelerator_count)
    if settings.s3_secret_name:
        kubernetes.use_secret_as_env(
            task,
            secret_name=settings.s3_secret_name,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
        )
    if settings.s3_endpoint_url:
        task.set_env_variable("S3_ENDPOINT_URL", settings.s3_endpoint_url)
    for name, value in {**settings.trainer.task_env(), **settings.telemetry_env}.items():
        task.set_env_variable(name, value)
    for key, value in settings.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in settings.tolerations:
        kubernetes.add_toleration(
            task,
            key=tol.get("key"),
            operator=tol.get("operator"),
            value=tol.get("value"),
            effect=tol.get("effect"),
            toleration_seconds=tol.get("toleration_seconds", tol.get("tolerationSeconds")),
        )
    if settings.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(settings.image_pull_secrets))
    if settings.model_cache_pvc:
        from pipelines.settings import MODEL_CACHE_MOUNT

        kubernetes.mount_pvc(task, pvc_name=settings.model_cache_pvc, mount_path=MODEL_CACHE_MOUNT)


def build_pipeline(settings: PipelineSettings) -> Callable[..., Any]:
    """The ``@dsl.pipeline`` function, configured by ``settings`` (image, resources, ...)."""
    from kfp import dsl, kubernetes

    from pipelines.component import make_components

    train_op, notify_op = make_components(settings)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="LoRA fine-tuning of a Llama model with torchtune, for llama-stack.",
    )
    def lora_finetune(
        job_uuid: str,
        request_json: str,
        model_uri: str,
        dataset_uri: str,
        validation_dataset_uri: str = "",
        checkpoint_format: str = settings.checkpoint_format,
        progress_path: str = "",
        result_uri: str = "",
        notify_url: str = "",
        notify_event_type: str = "",
        notify_window_s: float = NOTIFY_WINDOW_S,
        cache_dir: str = settings.task_cache_dir,
        traceparent: str = "",
        tracestate: str = "",
        request_digest: str = "",
        task_events: str = "",
        token_audience: str = settings.token_audience,
        allowed_roots: str = "",
        caller: str = "",
    ) -> None:
        notify = notify_op(
            job_uuid=job_uuid,
            notify_url=notify_url,
            notify_event_type=notify_event_type,
            notify_window_s=notify_window_s,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            traceparent=traceparent,
            tracestate=tracestate,
            token_audience=token_audience,
        ).set_caching_options(False)
        notify.set_display_name(NOTIFY_TASK)
        _pod_identity_env(notify)
        for name, value in settings.telemetry_env.items():  # its span joins the job's trace
            notify.set_env_variable(name, value)
        if settings.image_pull_secrets:
            kubernetes.set_image_pull_secrets(notify, list(settings.image_pull_secrets))
        with dsl.ExitHandler(notify, name="finetune"):
            model = dsl.importer(
                artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False
            ).set_display_name("model")
            dataset = dsl.importer(
                artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=True
            ).set_display_name("dataset")
            train = train_op(
                job_uuid=job_uuid,
                request_json=request_json,
                model_uri=model_uri,
                dataset_uri=dataset_uri,
                validation_dataset_uri=validation_dataset_uri,
                checkpoint_format=checkpoint_format,
                progress_path=progress_path,
                result_uri=result_uri,
                cache_dir=cache_dir,
                traceparent=traceparent,
                tracestate=tracestate,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                task_events=task_events,
                token_audience=token_audience,
                allowed_roots=allowed_roots,
            )
            train.set_display_name(TRAIN_TASK)
            _pod_identity_env(train)
            train.after(model, dataset)
            _configure_train(train, settings)
            with dsl.If(validation_dataset_uri != "", name="has-validation-dataset"):
                dsl.importer(
                    artifact_uri=validation_dataset_uri, artifact_class=dsl.Dataset, reimport=True
                ).set_display_name("validation-dataset")

    return lora_finetune


def compile_pipeline(settings: PipelineSettings, out: Path) -> Path:
    """Write the pipeline's IR YAML to ``out``; return it."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), package_path=str(out))
    return out


__all__ = [
    "NOTIFY_TASK",
    "PIPELINE_NAME",
    "ROOTS_FIELD",
    "TRAIN_TASK",
    "build_pipeline",
    "compile_pipeline",
    "pipeline_arguments",
]
