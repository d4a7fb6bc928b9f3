"""Remote mode's backend: one KFP run per job on a KFP server, results read back from S3.

Submit is idempotent across replicas and restarts because the run's display name *is* the
job_uuid: the experiment is searched by that name before anything is created, and if two
replicas still race, both keep the oldest run and terminate the younger. Status is always read
from KFP (so any replica can answer), plus the result manifest the train task writes to S3:
the exit handler's ``run.finished`` notice arrives while KFP still shows the run as RUNNING
(the exit task is part of the run), so a finished manifest is what makes that notice final.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from handler import logs
from handler.backends.base import BackendRejected, BackendUnavailable, RunState
from handler.contract import RUN_FINISHED, JobStatus
from handler.remote import s3
from handler.remote.kfp import KfpClient, KfpError, KfpNotFound
from handler.settings import HandlerSettings

if TYPE_CHECKING:
    from handler.store import JobStore
    from pipelines.settings import PipelineSettings

log = logs.get("handler.remote.backend")

READY_TIMEOUT_S: Final = 3.0
_EPOCH: Final = "1970-01-01"
# KFP states whose job has not ended (job_status maps them to scheduled or in_progress).
ACTIVE_STATES: Final = ("PENDING", "RUNTIME_STATE_UNSPECIFIED", "RUNNING", "PAUSED")
_JOB_UUID: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def job_status(state: str | None) -> JobStatus:
    """The one mapping from a KFP v2beta1 run state to a job status."""
    match state:
        case "PENDING" | "RUNTIME_STATE_UNSPECIFIED" | None:
            return JobStatus.scheduled
        case "RUNNING" | "PAUSED":
            return JobStatus.in_progress
        case "SUCCEEDED":
            return JobStatus.completed
        case "FAILED" | "SKIPPED":
            return JobStatus.failed
        case "CANCELING" | "CANCELED":
            return JobStatus.cancelled
        case _:
            log.warning("unknown KFP run state; treating it as scheduled", extra={"state": state})
            return JobStatus.scheduled


def _manifest_status(manifest: dict[str, Any]) -> JobStatus | None:
    try:
        status = JobStatus(manifest.get("status"))
    except ValueError:
        return None
    return status if status.terminal else None


def _time(value: Any) -> datetime | None:
    if value is None or str(value).startswith(_EPOCH):
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _started_at(run: Any) -> datetime | None:
    for entry in run.state_history or []:
        if entry.state == "RUNNING":
            return _time(entry.update_time)
    return None


def _run_error(run: Any) -> str | None:
    error = getattr(run, "error", None)
    message = getattr(error, "message", None) if error is not None else None
    return str(message) if message else None


class RemoteBackend:
    """Runs jobs on KFP (see the module docstring). Built per service; no I/O until used."""

    name = "remote"
    max_concurrent = None  # KFP queues runs itself
    poll_interval_s = None  # completion comes from the exit-handler notice and the ping tick
    describes_jobs = True  # KFP is the system of record: any replica answers GET /jobs/<id>

    def __init__(self, settings: HandlerSettings, store: JobStore) -> None:
        remote = settings.remote
        if not remote.kfp_host and not remote.dspa_name:
            raise ValueError(
                "remote mode needs the KFP API: set KFP_HOST, or KFP_DSPA_NAME (and "
                "KFP_NAMESPACE) to discover it from a DataSciencePipelinesApplication"
            )
        if not remote.s3_bucket:
            raise ValueError("remote mode needs S3_BUCKET for models and results")
        if not remote.notify_url:
            log.warning(
                "KFP_TRAINER_NOTIFY_URL is not set: runs will not post run.finished; "
                "completions then arrive with the dev.knative.sources.ping reconcile only"
            )
        self.settings = settings
        self.remote = remote
        self.store = store
        self.kfp = KfpClient(remote)
        self._pipeline_settings: PipelineSettings = settings.pipeline
        self._lock = threading.Lock()
        self._spec: dict[str, Any] | None = None
        self._s3: Any = None

    def default_model_store(self) -> str:
        """Model names resolve here without KFP_TRAINER_MODEL_STORE (upload-model writes here)."""
        return s3.model_store(self.remote)

    # ---- helpers ----------------------------------------------------------------------------
    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = s3.s3_client(self.remote)
        return self._s3

    def pipeline_spec(self) -> dict[str, Any]:
        """The compiled pipeline as the run body's ``pipeline_spec`` (compiled once)."""
        with self._lock:
            if self._spec is None:
                self._spec = self._compile()
            return self._spec

    def _compile(self) -> dict[str, Any]:
        import yaml

        from pipelines.pipeline import compile_pipeline

        settings = self._pipeline_settings
        with tempfile.TemporaryDirectory(prefix="kfp-trainer-ir-") as tmp:
            path = compile_pipeline(settings, Path(tmp) / "pipeline.yaml")
            docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        spec, platform = docs[0], {}
        for doc in docs[1:]:
            platform.update(doc)
        # The body kfp.Client sends: the IR, or both specs when kfp-kubernetes settings exist.
        return {"pipeline_spec": spec, "platform_spec": platform} if platform else spec

    def arguments(self, request: dict[str, Any]) -> dict[str, Any]:
        """The run's parameters: the same as a local run's, plus S3 result and notice targets."""
        from pipelines.pipeline import pipeline_arguments

        return pipeline_arguments(
            request,
            result_uri=s3.result_uri(self.remote, request["job_uuid"]),
            notify_url=self.remote.notify_url,
            notify_event_type=RUN_FINISHED if self.remote.notify_url else "",
            notify_window_s=self.remote.notify_window_s,
        )

    def _check(self, request: dict[str, Any]) -> None:
        """Artifacts must be where a pod can read them: S3, not this machine's disk."""
        problems = []
        for field in ("model_artifact", "dataset", "validation_dataset"):
            uri = (request.get(field) or {}).get("uri")
            if uri and not uri.startswith("s3://"):
                problems.append(
                    f"{field}.uri {uri!r} is not an s3:// URI; remote runs read artifacts "
                    "from S3 (upload models with `kfp-trainer upload-model`)"
                )
        if not (request.get("model_artifact") or {}).get("uri"):
            problems.append(
                "model_artifact.uri is missing (the handler resolves it from the store)"
            )
        if problems:
            raise BackendRejected("; ".join(problems))

    def _experiment_id(self) -> str:
        return self.kfp.experiment_id(self.remote.kfp_experiment)

    def _find(self, job_uuid: str) -> Any | None:
        runs = self.kfp.runs_named(self._experiment_id(), job_uuid)
        return runs[0] if runs else None

    # ---- Backend ----------------------------------------------------------------------------
    def submit(self, request: dict[str, Any]) -> str:
        self._check(request)
        try:
            return self._submit(request)
        except KfpNotFound as exc:  # the experiment was deleted under us: recreate next time
            self.kfp.forget_experiments()
            raise BackendUnavailable(f"KFP experiment vanished; retrying: {exc}") from None

    def _submit(self, request: dict[str, Any]) -> str:
        job_uuid = request["job_uuid"]
        experiment_id = self._experiment_id()
        existing = self.kfp.runs_named(experiment_id, job_uuid)
        if existing:
            log.info(
                "run already exists; not creating another",
                extra={"job_uuid": job_uuid, "run_id": existing[0].run_id},
            )
            return existing[0].run_id
        try:
            spec = self.pipeline_spec()
            arguments = self.arguments(request)
        except (ValueError, KeyError) as exc:
            raise BackendRejected(f"the request cannot become a pipeline run: {exc}") from None
        try:
            created = self.kfp.create_run(experiment_id, job_uuid, spec, arguments)
        except KfpError as exc:
            if exc.status == 400:
                raise BackendRejected(str(exc)) from None
            raise
        log.info(
            "kfp run created",
            extra={"job_uuid": job_uuid, "run_id": created.run_id, "kfp_host": self.kfp.host},
        )
        return self._converge(experiment_id, job_uuid, created.run_id)

    def _converge(self, experiment_id: str, job_uuid: str, run_id: str) -> str:
        """If replicas raced and both created a run, keep the oldest and stop the others."""
        runs = self.kfp.runs_named(experiment_id, job_uuid)
        if len(runs) <= 1:
            return run_id
        keep = runs[0].run_id
        for run in runs[1:]:
            if run.run_id == run_id:
                log.warning(
                    "duplicate run for one job; terminating the younger",
                    extra={"job_uuid": job_uuid, "run_id": run_id, "kept": keep},
                )
                self.kfp.terminate_run(run_id)
        return keep

    def list_active(self) -> list[str]:
        """The job_uuids of the experiment's runs that have not ended (PING re-adopts those the
        store lost). Only runs this deployment made count: display name = job_uuid parameter."""
        try:
            runs = self.kfp.runs_in_states(self._experiment_id(), ACTIVE_STATES)
        except KfpNotFound:  # the experiment was deleted: nothing of ours runs there
            self.kfp.forget_experiments()
            return []
        found: list[str] = []
        for run in runs:
            name = run.display_name or ""
            params = getattr(run.runtime_config, "parameters", None) or {}
            if _JOB_UUID.match(name) and params.get("job_uuid") == name and name not in found:
                found.append(name)
        return found

    def status(self, job_uuid: str, run_id: str | None) -> RunState:
        if run_id is None:
            found = self._find(job_uuid)
            if found is None:
                return RunState(status=JobStatus.scheduled)
            run_id = found.run_id
        try:
            run = self.kfp.get_run(run_id)
        except KfpNotFound:
            return RunState(
                status=JobStatus.failed,
                run_id=run_id,
                error=f"KFP run {run_id} no longer exists (deleted?)",
            )
        return dataclasses.replace(self._state(job_uuid, run), scheduled_at=_time(run.created_at))

    def _state(self, job_uuid: str, run: Any) -> RunState:
        run_id = run.run_id
        status = job_status(run.state)
        started = _started_at(run)
        if status in (JobStatus.scheduled, JobStatus.cancelled):
            return RunState(
                status=status,
                run_id=run_id,
                started_at=started,
                completed_at=_time(run.finished_at) if status.terminal else None,
            )
        if status == JobStatus.in_progress:
            return self._in_progress(job_uuid, run_id, started)
        return self._ended(job_uuid, run, status, started)

    def _in_progress(self, job_uuid: str, run_id: str, started: datetime | None) -> RunState:
        """Running in KFP; but if the train task's manifest is written, the job has ended."""
        try:
            manifest = s3.read_result(self._s3_client(), self.remote, job_uuid)
        except (BackendUnavailable, s3.ManifestError) as exc:
            log.info(
                "result manifest not readable yet", extra={"job_uuid": job_uuid, "why": str(exc)}
            )
            manifest = None
        final = _manifest_status(manifest) if manifest else None
        if final is None:
            return RunState(status=JobStatus.in_progress, run_id=run_id, started_at=started)
        return RunState(
            status=final,
            run_id=run_id,
            started_at=started,
            result=manifest or {},
            error=(manifest or {}).get("error") if final != JobStatus.completed else None,
        )

    def _ended(
        self, job_uuid: str, run: Any, status: JobStatus, started: datetime | None
    ) -> RunState:
        where = s3.result_uri(self.remote, job_uuid) + s3.RESULT_FILE
        try:
            manifest = s3.read_result(self._s3_client(), self.remote, job_uuid)
        except s3.ManifestError as exc:
            return RunState(
                status=JobStatus.failed,
                run_id=run.run_id,
                started_at=started,
                completed_at=_time(run.finished_at),
                error=str(exc),
            )
        except BackendUnavailable:
            if status == JobStatus.completed:
                raise  # the result is needed: try again later
            manifest = None
        done = dict(run_id=run.run_id, started_at=started, completed_at=_time(run.finished_at))
        if status == JobStatus.completed:
            if manifest is None:
                return RunState(
                    status=JobStatus.failed,
                    error=f"the run succeeded but wrote no result manifest at {where}",
                    **done,
                )
            if _manifest_status(manifest) == JobStatus.failed:
                return RunState(
                    status=JobStatus.failed, result=manifest, error=manifest.get("error"), **done
                )
            return RunState(status=JobStatus.completed, result=manifest, **done)
        error = (manifest or {}).get("error") or _run_error(run) or f"the KFP run ended {run.state}"
        return RunState(status=JobStatus.failed, result=manifest or {}, error=error, **done)

    def cancel(self, job_uuid: str, run_id: str | None) -> None:
        if run_id is None:
            found = self._find(job_uuid)
            if found is None:
                return
            run_id = found.run_id
        try:
            run = self.kfp.get_run(run_id)
            if job_status(run.state).terminal:
                return
            self.kfp.terminate_run(run_id)
        except KfpNotFound:
            return
        log.info("kfp run terminate requested", extra={"job_uuid": job_uuid, "run_id": run_id})

    def ready(self) -> bool:
        try:
            self.kfp.healthz(timeout_s=READY_TIMEOUT_S)
        except BackendUnavailable as exc:
            log.warning("kfp not ready", extra={"problem": str(exc)})
            return False
        except KfpError as exc:
            log.warning("kfp healthz refused", extra={"problem": str(exc)})
            return False
        return True
