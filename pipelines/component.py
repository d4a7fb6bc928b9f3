"""The pipeline's two KFP components: ``train`` and the exit task ``notify``.

Both are lightweight Python components whose bodies only import this project and call into it
(pipelines.component_impl, pipelines.notify), so the image needs this project installed and
nothing is pip-installed at run time (install_kfp_package=False). The base image comes from
PipelineSettings, hence the factory.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from pipelines.settings import PipelineSettings


def train(
    job_uuid: str,
    request_json: str,
    model_uri: str,
    dataset_uri: str,
    validation_dataset_uri: str,
    checkpoint_format: str,
    progress_path: str,
    result_uri: str,
    cache_dir: str,
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    traceparent: str = "",
    tracestate: str = "",
    run_id: str = "",
    task_events: str = "",
    token_audience: str = "",
    allowed_roots: str = "",
):
    """LoRA fine-tuning with torchtune; the output model's metadata is the RunResult, the
    metrics (loss, tokens/s, memory per epoch) are what the KFP UI shows for the run."""
    from pipelines.component_impl import run_train, training_metrics

    result = run_train(
        job_uuid=job_uuid,
        request_json=request_json,
        model_uri=model_uri,
        dataset_uri=dataset_uri,
        validation_dataset_uri=validation_dataset_uri,
        checkpoint_format=checkpoint_format,
        progress_path=progress_path,
        result_uri=result_uri,
        cache_dir=cache_dir,
        artifact_path=model.path,
        trace={"traceparent": traceparent, "tracestate": tracestate},
        run_id=run_id,
        task_events=task_events,
        token_audience=token_audience,
        allowed_roots=allowed_roots,
    )
    model.metadata.update(result)
    for name, value in training_metrics(result).items():
        metrics.log_metric(name, value)


def notify(
    job_uuid: str,
    notify_url: str,
    notify_event_type: str,
    run_id: str,
    status: dsl.PipelineTaskFinalStatus,
    notify_window_s: float,
    traceparent: str = "",
    tracestate: str = "",
    token_audience: str = "",
):
    """Exit task: POST a run-finished CloudEvent (when notify_url is set), whatever happened."""
    from pipelines.notify import post_run_finished

    post_run_finished(
        notify_url,
        notify_event_type,
        job_uuid,
        run_id,
        status.state,
        status.error_message or None,
        window_s=notify_window_s,
        trace={"traceparent": traceparent, "tracestate": tracestate},
        token_audience=token_audience,
    )


def make_components(settings: PipelineSettings) -> tuple:
    """(train, notify) as KFP components on ``settings.base_image``."""
    opts = {"base_image": settings.base_image, "install_kfp_package": False}
    return dsl.component(train, **opts), dsl.component(notify, **opts)


__all__ = ["make_components"]
