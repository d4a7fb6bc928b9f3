"""The jobs as KFP and S3 record them: remote mode's only state.

A job is the oldest run in the configured experiment (``KFP_EXPERIMENT``) whose display name is
its job_uuid and whose ``job_uuid`` parameter says the same (its ``caller`` parameter is who
requested it, what the per-caller limit counts by); its result and progress are JSON
objects under ``jobs/<job_uuid>/`` in S3 (handler/remote/s3.py). Nothing is remembered between
calls, so any replica, a restarted one included, answers the same.

Creating is find-then-create, and racing replicas converge: whoever sees more than one run for
a job keeps the oldest and deletes the younger ones (terminating them first), so one run per
job survives. The request's content digest travels as the ``request_digest`` parameter, which
is how a redelivered request is told from a changed one.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from handler import contract, logs
from handler.backends.base import BackendRejected, BackendUnavailable, RunState
from handler.remote import s3
from handler.remote.kfp import KfpClient, KfpError, KfpNotFound
from handler.remote.outcome import Manifest, Notice, decide
from handler.settings import HandlerSettings, SettingsError

log = logs.get("handler.remote.runs")

TERMINAL_STATES: Final = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
# A run in one of these has not ended (CANCELING still holds its pods).
UNFINISHED_STATES: Final = ("PENDING", "RUNNING", "PAUSED", "CANCELING")
# kfp's DSL keeps the pipeline being defined in a process-wide context: one compile at a time.
_COMPILING: Final = threading.Lock()
_JOB_UUID: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def parameters(run: Any) -> dict[str, Any]:
    return dict(getattr(run.runtime_config, "parameters", None) or {})


def is_ours(run: Any) -> bool:
    """A run this deployment made: display name = its job_uuid parameter."""
    name = run.display_name or ""
    return bool(_JOB_UUID.match(name)) and parameters(run).get("job_uuid") == name


def run_trace(run: Any) -> dict[str, str]:
    """The job's W3C trace context: the run's ``traceparent``/``tracestate`` parameters, which
    is how a handler that keeps nothing continues a job's trace when its run ends."""
    params = parameters(run)
    return {k: str(params[k]) for k in contract.TRACE_ATTRIBUTES if params.get(k)}


def caller(run: Any) -> str:
    """Who requested the job ("" when identity checks were off)."""
    return str(parameters(run).get("caller") or "")


def request_digest(run: Any) -> str | None:
    """The digest of the job.requested that made the run ("" or None: made before digests)."""
    return parameters(run).get("request_digest") or None


class KfpRuns:
    """Find, create, read and stop the runs of jobs (see the module docstring). No I/O until used.

    Thread-safe: the threads of one gunicorn worker share one instance.
    """

    def __init__(self, settings: HandlerSettings) -> None:
        remote = settings.remote
        if not remote.kfp_host and not remote.dspa_name:
            raise SettingsError(
                "remote mode needs the KFP API: set KFP_HOST, or KFP_DSPA_NAME (and "
                "KFP_NAMESPACE) to discover it from a DataSciencePipelinesApplication"
            )
        if not remote.s3_bucket:
            raise SettingsError("remote mode needs S3_BUCKET for models and results")
        self.settings = settings
        self.remote = remote
        self.kfp = KfpClient(remote)
        self.events_url = remote.notify_url or settings.sink
        if not self.events_url:
            log.warning(
                "neither KFP_TRAINER_NOTIFY_URL nor K_SINK is set: runs will not post "
                "run.finished or progress; ends are announced by the reconcile tick only"
            )
        self._lock = threading.Lock()
        self._spec: dict[str, Any] | None = None
        self._spec_json: bytes | None = None
        self._s3: Any = None

    # ---- what runs are made of --------------------------------------------------------------
    def pipeline_spec(self) -> dict[str, Any]:
        """The compiled pipeline as the run body's ``pipeline_spec`` (compiled once)."""
        with self._lock:
            if self._spec is None:
                with _COMPILING:
                    self._spec = self._compile()
            return self._spec

    def pipeline_spec_json(self) -> bytes:
        """:meth:`pipeline_spec` as JSON, encoded once: every run's body carries it as is
        (~14 kB: sanitizing and encoding it per request cost ~0.35 ms of handler CPU)."""
        spec = self.pipeline_spec()
        with self._lock:
            if self._spec_json is None:
                self._spec_json = json.dumps(spec, separators=(",", ":")).encode()
            return self._spec_json

    def _compile(self) -> dict[str, Any]:
        import yaml

        from pipelines.pipeline import compile_pipeline

        with tempfile.TemporaryDirectory(prefix="kfp-trainer-ir-") as tmp:
            path = compile_pipeline(self.settings.pipeline, Path(tmp) / "pipeline.yaml")
            docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        spec, platform = docs[0], {}
        for doc in docs[1:]:
            platform.update(doc)
        # The body kfp.Client sends: the IR, or both specs when kfp-kubernetes settings exist.
        return {"pipeline_spec": spec, "platform_spec": platform} if platform else spec

    def arguments(self, request: dict[str, Any], digest: str, caller: str = "") -> dict[str, Any]:
        """The run's parameters: a local run's, plus where results, notices and events go."""
        from pipelines.pipeline import pipeline_arguments
        from pipelines.task_events import PROGRESS_FILE, TaskEventsConfig

        job_uuid = request["job_uuid"]
        result_uri = s3.result_uri(self.remote, job_uuid)
        events = TaskEventsConfig(
            url=self.events_url,
            source=self.settings.source,
            started_type=contract.JOB_STARTED,
            started_id=contract.event_id(job_uuid, contract.JOB_STARTED),
            progress_type=contract.JOB_PROGRESS,
            progress_id_prefix=contract.event_id(job_uuid, contract.JOB_PROGRESS) + "/",
            interval_s=self.settings.progress_interval_s,
            progress_uri=result_uri + PROGRESS_FILE,
        )
        return pipeline_arguments(
            request,
            result_uri=result_uri,
            notify_url=self.events_url,
            notify_event_type=contract.RUN_FINISHED if self.events_url else "",
            notify_window_s=self.remote.notify_window_s,
            request_digest=digest,
            task_events=events.to_json() if self.events_url else "",
            caller=caller,
        )

    @staticmethod
    def check(request: dict[str, Any]) -> None:
        """Artifacts must be where a pod can read them: S3 (datasets also https://), not this
        machine's disk.

        :raises BackendRejected: naming each field that is not an s3:// URI.
        """
        problems = []
        for field in ("model_artifact", "dataset", "validation_dataset"):
            uri = (request.get(field) or {}).get("uri")
            readable = ("s3://",) if field == "model_artifact" else ("s3://", "https://")
            if uri and not uri.startswith(readable):
                problems.append(
                    f"{field}.uri {uri!r} is not an s3:// URI; remote runs read artifacts "
                    "from S3 (upload models with `kfp-trainer upload-model`)"
                )
        if problems:
            raise BackendRejected("; ".join(problems))

    # ---- finding and creating ---------------------------------------------------------------
    def _experiment_id(self) -> str:
        try:
            return self.kfp.experiment_id(self.remote.kfp_experiment)
        except KfpNotFound as exc:
            self.kfp.forget_experiments()
            raise BackendUnavailable(f"KFP experiment lookup failed; retry: {exc}") from None

    def _named(self, job_uuid: str) -> list[Any]:
        experiment_id = self._experiment_id()
        try:
            runs = self.kfp.runs_named(experiment_id, job_uuid)
        except KfpNotFound:  # the experiment was deleted under us: look it up afresh next time
            self.kfp.forget_experiments()
            raise BackendUnavailable("the KFP experiment vanished; retry") from None
        return [r for r in runs if is_ours(r)]

    def find(self, job_uuid: str) -> Any | None:
        """The job's run (the oldest with its name), or None when KFP has none.

        Younger duplicates, left by replicas that raced, are deleted on the way.

        :raises BackendUnavailable: KFP cannot be asked right now.
        """
        runs = self._named(job_uuid)
        if len(runs) > 1:
            self._delete_younger(job_uuid, runs)
        return runs[0] if runs else None

    def create(
        self, request: dict[str, Any], digest: str, *, look_first: bool = True, caller: str = ""
    ) -> tuple[Any, bool]:
        """The job's run, created now unless it exists: (run, whether this call created it).

        ``look_first=False``: the caller has just found none (one KFP call saved).

        :raises BackendRejected: the request cannot become a run (names why).
        :raises BackendUnavailable: KFP cannot be reached; nothing was created, or a run was
            and the retry will find it.
        """
        self.check(request)
        job_uuid = request["job_uuid"]
        existing = self.find(job_uuid) if look_first else None
        if existing is not None:
            return existing, False
        try:
            spec = self.pipeline_spec_json()
            arguments = self.arguments(request, digest, caller)
        except (ValueError, KeyError) as exc:
            raise BackendRejected(f"the request cannot become a pipeline run: {exc}") from None
        try:
            created = self.kfp.create_run(self._experiment_id(), job_uuid, spec, arguments)
        except KfpNotFound:
            self.kfp.forget_experiments()
            raise BackendUnavailable("the KFP experiment vanished; retry") from None
        except KfpError as exc:
            if exc.status == 400:
                raise BackendRejected(str(exc)) from None
            raise BackendUnavailable(str(exc)) from None
        log.info("kfp run created", extra={"job_uuid": job_uuid, "run_id": created.run_id})
        kept = self.find(job_uuid)  # converge with a replica that raced this one
        if kept is None:  # not listed yet: it is the only one we know of
            return created, True
        return kept, kept.run_id == created.run_id

    def _delete_younger(self, job_uuid: str, runs: list[Any]) -> None:
        for run in runs[1:]:
            log.warning(
                "duplicate run for one job; deleting the younger",
                extra={"job_uuid": job_uuid, "run_id": run.run_id, "kept": runs[0].run_id},
            )
            try:
                self.kfp.terminate_run(run.run_id)
                self.kfp.delete_run(run.run_id)
            except KfpNotFound:
                continue  # another replica was quicker

    # ---- reading ----------------------------------------------------------------------------
    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = s3.s3_client(self.remote)
        return self._s3

    def get(self, run_id: str) -> Any | None:
        try:
            return self.kfp.get_run(run_id)
        except KfpNotFound:
            return None

    def state(self, run: Any, notice: Notice | None = None) -> RunState:
        """What the run, its manifest and ``notice`` say about the job (outcome.decide).

        :raises BackendUnavailable: S3 cannot be read (a terminal answer is never guessed).
        """
        job_uuid = run.display_name
        client = self._s3_client()
        try:
            stored = s3.read_json(client, self.remote, job_uuid, s3.RESULT_FILE)
        except s3.ManifestError as exc:
            stored, broken = None, str(exc)
        else:
            broken = None
        manifest = Manifest(stored.value, stored.modified) if stored else None
        where = s3.result_uri(self.remote, job_uuid) + s3.RESULT_FILE
        progress = None
        if manifest is None and run.state in ("RUNNING", "PAUSED"):
            try:
                found = s3.read_json(client, self.remote, job_uuid, s3.PROGRESS_FILE)
            except s3.ManifestError:
                found = None
            progress = found.value if found else None
        decided = decide(run, manifest, where=where, notice=notice, progress=progress)
        if broken and decided.status.terminal and decided.status != contract.JobStatus.cancelled:
            return RunState(
                status=contract.JobStatus.failed,
                run_id=decided.run_id,
                scheduled_at=decided.scheduled_at,
                started_at=decided.started_at,
                completed_at=decided.completed_at,
                error=broken,
            )
        return decided

    def terminate(self, run: Any) -> None:
        try:
            self.kfp.terminate_run(run.run_id)
        except KfpNotFound:
            return
        log.info("kfp run terminate requested", extra={"job_uuid": run.display_name})

    def ended_since(self, cutoff: datetime) -> list[Any]:
        """This deployment's runs that ended at or after ``cutoff`` (oldest first)."""
        runs = self.kfp.runs_in_states(
            self._experiment_id(), TERMINAL_STATES, finished_after=cutoff
        )
        return [r for r in runs if is_ours(r)]

    def active_for(self, who: str) -> int:
        """How many of this deployment's unfinished runs ``who`` requested (their ``caller``
        parameter). One paged listing per call: KFP cannot filter on parameters.

        :raises BackendUnavailable: KFP cannot be asked right now.
        """
        runs = self.kfp.runs_in_states(self._experiment_id(), UNFINISHED_STATES)
        return sum(1 for r in runs if is_ours(r) and caller(r) == who)

    def page(self, token: str, size: int) -> tuple[list[Any], str]:
        """One page of this deployment's runs, newest first, and the next page's token."""
        runs, next_token = self.kfp.runs_page(self._experiment_id(), token, size)
        return [r for r in runs if is_ours(r)], next_token


__all__ = [
    "TERMINAL_STATES",
    "UNFINISHED_STATES",
    "KfpRuns",
    "caller",
    "is_ours",
    "parameters",
    "request_digest",
    "run_trace",
]
