"""What the ``train`` task does, as plain Python the KFP component body calls into.

The component function KFP serialises stays a three-line shim; this module does the work so it
can be imported, tested and benchmarked like any other code:

1. fetch the model (s3:// into the cache, local in place) and stage it (dir/tar/tar.gz);
2. fetch the datasets (never inlined in the spec: they arrive as files);
3. run the recipe, reporting progress (remote: as events too, pipelines/task_events.py);
4. publish: with an s3:// ``result_uri`` upload each checkpoint under it and rewrite paths; with
   a local one the checkpoints are written there in place. ``result.json`` goes last, so its
   presence means everything it points to exists. A failure writes a failed result.json, and
   the error to the container's termination message (pipelines/termination.py).

The task continues the job's trace (the ``traceparent`` parameter) with a ``train`` span and a
child span per step above, the recipe's epochs and checkpoints included (pipelines/tracing.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pipelines import logs, storage, tracing
from pipelines.data import DatasetError, DatasetRead, normalize, source_format
from pipelines.logs import event
from pipelines.progress import ProgressReporter
from pipelines.result import RunResult
from pipelines.roots import Roots
from pipelines.sa_token import bearer_for
from pipelines.settings import SettingsError, TrainerSettings
from pipelines.staging import StagingError, content_digest, stage_model
from pipelines.task_events import TaskEvents, TaskEventsConfig
from pipelines.termination import write_termination_message
from pipelines.validation import RequestError, local_path

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CHECKPOINTS_DIR = "checkpoints"
TRACER: Final = "pipelines"
SERVICE_NAME: Final = "kfp-trainer-train"


class TrainingFailed(RuntimeError):
    """The train task failed; the message is the error recorded in result.json."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (message is enough), as opposed to bugs (traceback too)."""
    from pipelines.modeling import ModelDirError

    return (
        RequestError,
        SettingsError,
        DatasetError,
        StagingError,
        storage.StorageError,
        ModelDirError,
        FloatingPointError,
    )


def _read_dataset(
    field: str, path: Path, uri: str, ref: dict[str, Any], data_format: str, out: Path
) -> DatasetRead:
    """Read a fetched dataset, check every row and write the JSONL the recipe reads to ``out``.

    Passed by reference it is CSV, JSONL or Parquet (``format``, else the file name says);
    staged it is JSONL. Either way it must match what the request says of it (sha256, rows).
    """
    file_format = ref.get("format") or source_format(uri) or "jsonl"
    name = ref.get("dataset_id") or path.name
    with tracing.span(TRACER, "read dataset", attributes={"dataset": field}) as span:
        read = normalize(path, file_format, data_format, out, dataset=name, uri=uri)
        span.set_attributes({"rows": read.rows, "bytes": path.stat().st_size})
    want = ref.get("sha256")
    if want and read.sha256 != want:
        raise DatasetError(
            f"{field}.sha256: dataset {name!r} ({uri}) has sha256 {read.sha256}, the request "
            f"says {want}"
        )
    rows = ref.get("rows")
    if rows is not None and read.rows != rows:
        raise DatasetError(
            f"{field}.rows: the request says {rows} rows, dataset {name!r} ({uri}) has {read.rows}"
        )
    return read


def _check_roots(allowed_roots: str, uris: dict[str, str]) -> None:
    """:raises RequestError: a URI outside the roots the handler passed (nothing opened yet)."""
    if not allowed_roots:
        return  # run by hand (``kfp-trainer run``): the operator names the files
    refs = {field: {"uri": uri} for field, uri in uris.items() if uri}
    outside = Roots.from_json(allowed_roots).request_problems(refs)
    if outside:
        raise RequestError(outside)


def _fetch_model(uri: str, cache_dir: Path, sha256: str | None = None) -> Path:
    with tracing.span(TRACER, "fetch model", attributes={"uri": uri}) as span:
        path = _download_model(uri, cache_dir, sha256)
        span.set_attribute("bytes", storage.size_of(path))
    with tracing.span(TRACER, "extract model", attributes={"path": str(path)}) as span:
        staged = stage_model(path, cache_dir)
        span.set_attribute("bytes", storage.size_of(staged))
    return staged


def _download_model(uri: str, cache_dir: Path, sha256: str | None) -> Path:
    if storage.is_s3(uri):
        key = storage.fingerprint(uri)
        slot = cache_dir / "downloads" / key
        found = next(iter(slot.iterdir()), None) if slot.is_dir() else None
        if found is not None:
            event(log, "model download cached", uri=uri, path=str(found))
            path = found
        else:
            path = storage.fetch(uri, slot)
    else:
        path = local_path(uri)
        if path is None:
            raise StagingError(f"model_artifact.uri {uri!r}: unsupported scheme")
    if sha256:
        if path.is_file():
            got = content_digest(path, cache_dir)
            if got != sha256:
                raise StagingError(
                    f"model_artifact.sha256: {str(path)!r} has sha256 {got}, the "
                    f"request says {sha256}"
                )
        else:
            event(
                log,
                "model_artifact.sha256 not checked: the artifact is a directory",
                level=logging.WARNING,
                path=str(path),
            )
    return path


def _publish(result: RunResult, result_uri: str, checkpoint_root: Path) -> RunResult:
    """Upload checkpoints (s3) and rewrite their paths; local results are already in place."""
    if not storage.is_s3(result_uri):
        return result
    for ckpt in result.checkpoints:
        src = Path(ckpt["path"])
        dest = storage.join(
            result_uri, CHECKPOINTS_DIR, src.relative_to(checkpoint_root).as_posix()
        )
        with tracing.span(TRACER, "upload checkpoint", attributes={"uri": dest}) as span:
            storage.publish(src, dest)
            span.set_attribute("bytes", storage.size_of(src))
        ckpt["path"] = dest
        event(log, "checkpoint uploaded", identifier=ckpt["identifier"], uri=dest)
    return result


def _write_result(result: RunResult, result_uri: str, artifact_dir: Path | None) -> None:
    data = result.to_json().encode()
    if result_uri:
        storage.put_bytes(data, storage.join(result_uri, RESULT_FILE))
    if artifact_dir is not None:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        (artifact_dir / RESULT_FILE).write_bytes(data)


def run_train(
    *,
    job_uuid: str,
    request_json: str,
    model_uri: str,
    dataset_uri: str,
    validation_dataset_uri: str = "",
    checkpoint_format: str = "meta",
    progress_path: str = "",
    result_uri: str = "",
    cache_dir: str = "",
    artifact_path: str = "",
    trace: Mapping[str, str] | None = None,
    run_id: str = "",
    task_events: str = "",
    token_audience: str = "",
    allowed_roots: str = "",
) -> dict[str, Any]:
    """Run one job's training; return the RunResult dict (the output artifact's metadata).

    ``trace`` (traceparent, tracestate) is the job's trace context; the task's spans join it.
    ``token_audience``: the events it posts carry a token for it (pipelines/sa_token.py).
    ``allowed_roots`` (a JSON list, pipelines/roots.py): the only places the task may read;
    empty when run by hand.

    :raises TrainingFailed: after writing a failed result.json, naming the problem.
    """
    logs.configure(os.environ.get("KFP_TRAINER_LOG_LEVEL", "INFO"))
    logs.set_job(job_uuid, trace)
    tracing.init(SERVICE_NAME)
    try:
        with tracing.span(TRACER, "train", parent=trace, attributes={"job_uuid": job_uuid}):
            return _train(
                job_uuid=job_uuid,
                request_json=request_json,
                model_uri=model_uri,
                dataset_uri=dataset_uri,
                validation_dataset_uri=validation_dataset_uri,
                checkpoint_format=checkpoint_format,
                progress_path=progress_path,
                result_uri=result_uri,
                cache_dir=cache_dir,
                artifact_path=artifact_path,
                run_id=run_id,
                task_events=task_events,
                token_audience=token_audience,
                allowed_roots=allowed_roots,
            )
    finally:
        tracing.flush()


def _train(
    *,
    job_uuid: str,
    request_json: str,
    model_uri: str,
    dataset_uri: str,
    validation_dataset_uri: str,
    checkpoint_format: str,
    progress_path: str,
    result_uri: str,
    cache_dir: str,
    artifact_path: str,
    run_id: str,
    task_events: str,
    token_audience: str,
    allowed_roots: str,
) -> dict[str, Any]:
    artifact_dir = Path(artifact_path) if artifact_path else None
    scratch = Path(tempfile.mkdtemp(prefix=f"kfp-trainer-{job_uuid}-"))
    announcer: TaskEvents | None = None
    try:
        trainer_settings = TrainerSettings.from_env()  # the task's own environment, read once
        events_config = TaskEventsConfig.from_json(task_events)
        if events_config is not None:
            announcer = TaskEvents(
                events_config,
                job_uuid,
                run_id,
                token=bearer_for(token_audience),
                trace=tracing.carrier(),
            )
            announcer.started()
        request = json.loads(request_json)
        if request.get("job_uuid") != job_uuid:
            raise RequestError(
                [
                    f"job_uuid: parameter {job_uuid!r} does not match request_json "
                    f"{request.get('job_uuid')!r}"
                ]
            )
        event(
            log,
            "train task started",
            job_uuid=job_uuid,
            model=request.get("model"),
            model_uri=model_uri,
            dataset_uri=dataset_uri,
            validation_dataset_uri=validation_dataset_uri or None,
            result_uri=result_uri or None,
        )
        _check_roots(
            allowed_roots,
            {
                "dataset": dataset_uri,
                "validation_dataset": validation_dataset_uri,
                "model_artifact": model_uri,
            },
        )
        cache = Path(cache_dir) if cache_dir else scratch / "cache"
        # The refs' other fields (rows, sha256) came along without their URIs: check against them.
        refs = {
            k: request.pop(k, None) or {}
            for k in ("dataset", "validation_dataset", "model_artifact")
        }
        dataset = storage.fetch(dataset_uri, scratch / "dataset")
        validation = (
            storage.fetch(validation_dataset_uri, scratch / "validation")
            if validation_dataset_uri
            else None
        )
        request["dataset"] = {"uri": str(dataset)}
        if validation:
            request["validation_dataset"] = {"uri": str(validation)}
        # Config problems first: a bad request should not wait for a model download.
        from pipelines.validation import require_valid

        require_valid(request)
        data_format = request["training_config"]["data_config"]["data_format"]
        read = {
            "dataset": _read_dataset(
                "dataset", dataset, dataset_uri, refs["dataset"], data_format, scratch / "rows"
            )
        }
        if validation:
            read["validation_dataset"] = _read_dataset(
                "validation_dataset",
                validation,
                validation_dataset_uri,
                refs["validation_dataset"],
                data_format,
                scratch / "validation-rows",
            )
        model_dir = _fetch_model(model_uri, cache, refs["model_artifact"].get("sha256"))
        target = local_path(result_uri) if result_uri else None
        if target is not None:
            checkpoint_root = target / CHECKPOINTS_DIR
        elif result_uri:
            checkpoint_root = scratch / CHECKPOINTS_DIR
        else:
            checkpoint_root = (artifact_dir or scratch) / CHECKPOINTS_DIR

        from pipelines.recipe import run_recipe

        result = run_recipe(
            request,
            model_dir=model_dir,
            dataset_path=scratch / "rows",
            validation_path=scratch / "validation-rows" if validation else None,
            output_dir=checkpoint_root,
            checkpoint_format=checkpoint_format,
            progress=ProgressReporter(Path(progress_path) if progress_path else None, announcer),
            settings=trainer_settings,
        )
        result.datasets = {field: r.to_dict() for field, r in read.items()}
        result = _publish(result, result_uri, checkpoint_root)
        _write_result(result, result_uri, artifact_dir)
        event(
            log,
            "train task finished",
            job_uuid=job_uuid,
            status=result.status,
            checkpoints=len(result.checkpoints),
            dataset_rows=result.dataset_rows,
        )
        return result.to_dict()
    except Exception as exc:
        expected = isinstance(exc, _expected_errors())
        error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        event(log, "train task failed", level=logging.ERROR, job_uuid=job_uuid, error=error)
        if not expected:
            log.exception("unexpected error in the train task")
        write_termination_message(error)  # read back even if S3 refuses result.json too
        failed = RunResult(job_uuid=job_uuid, status="failed", error=error)
        try:
            _write_result(failed, result_uri, artifact_dir)
        except Exception as write_exc:  # the original error matters more
            event(log, "cannot write failed result", level=logging.ERROR, error=str(write_exc))
        raise TrainingFailed(error) from None
    finally:
        if announcer is not None:
            announcer.close()
        shutil.rmtree(scratch, ignore_errors=True)
        # torch and torchtune leave ~a million objects; the collections at interpreter exit
        # would walk them all (1.4 s here). Nothing of this process outlives the task.
        gc.freeze()


def training_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The run's numbers as KFP metrics: every number of each epoch's entry (loss, tokens/s,
    memory, whatever the recipe reports) as ``epoch<N>_<name>``, plus the run's peak memory."""
    out: dict[str, float] = {}
    for entry in result.get("metrics") or []:
        epoch = entry.get("epoch")
        for name, value in entry.items():
            if name != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                out[f"epoch{epoch}_{name}"] = float(value)
    resources = result.get("resources_allocated") or {}
    if isinstance(resources.get("peak_memory_bytes"), int | float):
        out["peak_memory_bytes"] = float(resources["peak_memory_bytes"])
    return out


__all__ = ["CHECKPOINTS_DIR", "RESULT_FILE", "TrainingFailed", "run_train", "training_metrics"]
