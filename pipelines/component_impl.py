"""What the ``train`` task does, as plain Python the KFP component body calls into.

The component function KFP serialises stays a three-line shim; this module does the work so it
can be imported, tested and benchmarked like any other code:

1. fetch the model (s3:// into the cache, local in place) and stage it (dir/tar/tar.gz);
2. fetch the datasets (never inlined in the spec: they arrive as files);
3. run the recipe, reporting progress;
4. publish: with an s3:// ``result_uri`` upload each checkpoint under it and rewrite paths; with
   a local one the checkpoints are written there in place. ``result.json`` goes last, so its
   presence means everything it points to exists. A failure writes a failed result.json.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines import logs, storage
from pipelines.data import DatasetError
from pipelines.logs import event
from pipelines.progress import ProgressReporter
from pipelines.result import RunResult
from pipelines.staging import StagingError, content_digest, stage_model
from pipelines.validation import RequestError, local_path

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CHECKPOINTS_DIR = "checkpoints"


class TrainingFailed(RuntimeError):
    """The train task failed; the message is the error recorded in result.json."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (message is enough), as opposed to bugs (traceback too)."""
    from pipelines.modeling import ModelDirError

    return (
        RequestError,
        DatasetError,
        StagingError,
        storage.StorageError,
        ModelDirError,
        FloatingPointError,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_file(field: str, path: Path, ref: dict[str, Any]) -> None:
    """The fetched dataset matches what the request says about it (sha256, row count)."""
    want = ref.get("sha256")
    if want and (got := _sha256(path)) != want:
        raise DatasetError(f"{field}.sha256: {path.name} has sha256 {got}, the request says {want}")
    rows = ref.get("rows")
    if rows is not None:
        with path.open("rb") as f:
            found = sum(1 for line in f if line.strip())
        if found != rows:
            raise DatasetError(
                f"{field}.rows: the request says {rows} rows, {path.name} has {found}"
            )


def _fetch_model(uri: str, cache_dir: Path, sha256: str | None = None) -> Path:
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
    return stage_model(path, cache_dir)


def _publish(result: RunResult, result_uri: str, checkpoint_root: Path) -> RunResult:
    """Upload checkpoints (s3) and rewrite their paths; local results are already in place."""
    if not storage.is_s3(result_uri):
        return result
    for ckpt in result.checkpoints:
        src = Path(ckpt["path"])
        dest = storage.join(
            result_uri, CHECKPOINTS_DIR, src.relative_to(checkpoint_root).as_posix()
        )
        storage.publish(src, dest)
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
) -> dict[str, Any]:
    """Run one job's training; return the RunResult dict (the output artifact's metadata).

    :raises TrainingFailed: after writing a failed result.json, naming the problem.
    """
    logs.configure(os.environ.get("KFP_TRAINER_LOG_LEVEL", "INFO"), stream=None)
    artifact_dir = Path(artifact_path) if artifact_path else None
    scratch = Path(tempfile.mkdtemp(prefix=f"kfp-trainer-{job_uuid}-"))
    try:
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
        cache = Path(cache_dir) if cache_dir else scratch / "cache"
        dataset = storage.fetch(dataset_uri, scratch / "dataset")
        validation = (
            storage.fetch(validation_dataset_uri, scratch / "validation")
            if validation_dataset_uri
            else None
        )
        # The refs' other fields (rows, sha256) came along without their URIs: check against them.
        refs = {
            k: request.pop(k, None) or {}
            for k in ("dataset", "validation_dataset", "model_artifact")
        }
        request["dataset"] = {"uri": str(dataset)}
        if validation:
            request["validation_dataset"] = {"uri": str(validation)}
        # Config problems first: a bad request should not wait for a model download.
        from pipelines.validation import require_valid

        require_valid(request)
        _check_file("dataset", dataset, refs["dataset"])
        if validation:
            _check_file("validation_dataset", validation, refs["validation_dataset"])
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
            dataset_path=dataset,
            validation_path=validation,
            output_dir=checkpoint_root,
            checkpoint_format=checkpoint_format,
            progress=ProgressReporter(Path(progress_path) if progress_path else None),
        )
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
        failed = RunResult(job_uuid=job_uuid, status="failed", error=error)
        try:
            _write_result(failed, result_uri, artifact_dir)
        except Exception as write_exc:  # the original error matters more
            event(log, "cannot write failed result", level=logging.ERROR, error=str(write_exc))
        raise TrainingFailed(error) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        # torch and torchtune leave ~a million objects; the collections at interpreter exit
        # would walk them all (1.4 s here). Nothing of this process outlives the task.
        gc.freeze()


__all__ = ["CHECKPOINTS_DIR", "RESULT_FILE", "TrainingFailed", "run_train"]
