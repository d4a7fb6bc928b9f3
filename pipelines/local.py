"""Running one job request through the pipeline on this machine (KFP's SubprocessRunner).

Blocking, one job per process: ``kfp.local`` keeps its configuration in a process-wide
singleton, so the handler runs each job as its own ``python -m pipelines run`` process.
Outputs live under ``workdir``: ``pipeline_root/`` (KFP's task outputs), ``result/``
(checkpoints and result.json, written by the train task itself).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pipelines import logs, tracing
from pipelines.component_impl import RESULT_FILE
from pipelines.logs import event
from pipelines.result import RunResult
from pipelines.settings import PipelineSettings

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "kfp-trainer-run"


def run_request(
    request: Mapping[str, Any],
    *,
    settings: PipelineSettings,
    workdir: Path,
    progress_path: Path | None = None,
) -> RunResult:
    """Run the whole pipeline for ``request`` and return its result (never raises for a failed
    run: the result says ``failed`` and names the problem).

    ``request`` needs ``model_artifact.uri``; its ``trace`` (the job's trace context) is
    continued by a ``local run`` span, which the tasks continue in turn. KFP's own log and the
    tasks' output go to stderr as JSON lines (pipelines/logs.py), so the caller's stdout stays
    clean.
    """
    from pipelines.pipeline import TRACE_FIELD, pipeline_arguments

    workdir = Path(workdir).resolve()
    result_dir = workdir / "result"
    result_file = result_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)  # never report a previous run's outcome
    workdir.mkdir(parents=True, exist_ok=True)
    if progress_path is not None:
        Path(progress_path).unlink(missing_ok=True)
    with tracing.span(
        "pipelines",
        "local run",
        parent=request.get(TRACE_FIELD),
        attributes={"job_uuid": request["job_uuid"]},
    ):
        args = pipeline_arguments(
            {**request, TRACE_FIELD: tracing.carrier()},
            progress_path=str(Path(progress_path).resolve()) if progress_path else "",
            result_uri=str(result_dir),
        )
        return _run(request, args, settings, workdir, result_file)


def _run(
    request: Mapping[str, Any],
    args: dict[str, Any],
    settings: PipelineSettings,
    workdir: Path,
    result_file: Path,
) -> RunResult:
    from kfp import local

    from pipelines.pipeline import build_pipeline

    args["cache_dir"] = str(settings.cache_dir)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "pipeline_root"),
        workspace_root=tempfile.mkdtemp(prefix=".workspace-", dir=workdir),
        raise_on_error=False,
    )
    pipeline = build_pipeline(settings)
    event(log, "local run starting", job_uuid=request["job_uuid"], workdir=str(workdir))
    kfp_output = logs.JsonLineStream(sys.stderr, logging.getLogger("pipelines.kfp"))
    with warnings.catch_warnings(), contextlib.redirect_stdout(kfp_output):
        # Our image name need not contain "python"; the subprocess runner warns about that.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*remote file.*dsl.importer.*")
        try:
            pipeline(**args)
        finally:
            kfp_output.flush()
    if result_file.is_file():
        result = RunResult.read(result_file)
    else:
        result = RunResult(
            job_uuid=str(request["job_uuid"]),
            status="failed",
            error="the pipeline failed before the train task recorded a result "
            "(see the run log for the failing task)",
        )
    event(
        log,
        "local run finished",
        job_uuid=result.job_uuid,
        status=result.status,
        error=result.error,
    )
    return result


__all__ = ["run_request"]
