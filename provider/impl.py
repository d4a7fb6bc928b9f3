"""The post_training API of ``remote::kfp-torchtune``: each call becomes or reads a CloudEvent.

``supervised_fine_tune`` validates, stages the datasets as JSONL, emits ``job.requested`` and
returns; training happens in the pipeline. Status, artifacts and the job list answer from the
provider's :class:`~provider.state.JobStore`, which the handler's events keep current.
"""

# No ``from __future__ import annotations`` here: llama-stack builds its FastAPI routes from
# these methods' signatures, and string annotations would reach FastAPI unresolved.

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from llama_stack.apis.datasetio import DatasetIO
from llama_stack.apis.datasets import Datasets
from llama_stack.apis.post_training import (
    Checkpoint,
    DPOAlignmentConfig,
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    TrainingConfig,
)
from llama_stack.apis.post_training.post_training import AlgorithmConfig
from llama_stack.providers.datatypes import HealthResponse, HealthStatus
from pydantic import Field, PlainSerializer

from handler import ingress
from handler.contract import timestamp
from pipelines import tracing
from provider import logs
from provider.background import BackgroundJobs
from provider.config import KfpTrainerConfig
from provider.datasets import DatasetPlan, check_in_sight, plan, require_purpose
from provider.request import ADAPTER, build_request
from provider.state import JobStore, is_terminal, now_iso, to_job_status
from provider.submission import STAGING, SUBMITTED, SUBMITTING, Submission
from provider.tracing import request_context
from provider.transport import DeliveryFailed, Transport, make_transport

log = logs.get("provider.impl")
TRACER = "provider"
SERVICE_NAME = "kfp-trainer-provider"


class JobNotFound(ValueError):
    """No job with this uuid was ever submitted here (llama-stack answers 400 for ValueError)."""


# A time as the contract writes it (handler.contract.timestamp: always milliseconds). Left to
# pydantic, a datetime on a whole second loses its fraction ("...:15Z"): one format in a thousand
# answers would be another.
ContractTime = Annotated[datetime, PlainSerializer(timestamp, when_used="json")]


class KfpCheckpoint(Checkpoint):
    """llama-stack's ``Checkpoint``, its ``created_at`` in the contract's time format."""

    created_at: ContractTime


class KfpJobArtifactsResponse(PostTrainingJobArtifactsResponse):
    """llama-stack's artifacts, their checkpoints' times in the contract's format."""

    checkpoints: list[KfpCheckpoint] = Field(default_factory=list)


class KfpJobStatusResponse(PostTrainingJobStatusResponse):
    """llama-stack's status plus what a waiting client wants: progress and the failure reason.

    The extra fields ride along in the JSON; the client SDK keeps unknown fields. Its times are
    written in the contract's format.
    """

    scheduled_at: ContractTime | None = None
    started_at: ContractTime | None = None
    completed_at: ContractTime | None = None
    checkpoints: list[KfpCheckpoint] = Field(default_factory=list)

    progress: dict[str, Any] | None = None
    error: str | None = None
    dataset_rows: int | None = None
    rows_without_trainable_tokens: int | None = None
    datasets: dict[str, Any] | None = None


def _age_s(record: dict[str, Any]) -> float:
    """Seconds since the job reached the handler (or was requested; 0 when unknown)."""
    since = record.get("submitted_at") or record.get("requested_at")
    if not since:
        return 0.0
    then = datetime.fromisoformat(since.replace("Z", "+00:00"))
    return (datetime.now(UTC) - then).total_seconds()


def _mark_cancel(record: dict[str, Any]) -> None:
    record["cancel_requested_at"] = now_iso()


def _dataset_view(chosen: DatasetPlan) -> dict[str, Any]:
    """What the job's status says about one dataset: which path it takes, from where."""
    view: dict[str, Any] = {"dataset_id": chosen.dataset_id, "delivery": chosen.delivery}
    view["source"] = chosen.uri or "rows"
    if chosen.format:
        view["format"] = chosen.format
    if chosen.delivery == "staged":
        view.update(reader=chosen.reader, rows_staged=0, bytes_staged=0)
    return view


def job_progress(record: dict[str, Any]) -> dict[str, Any]:
    """The one progress a status shows: the phase, staging's rows and bytes, training's steps.

    Present from the start: staging counts from ``scheduled`` on, training's ``step`` (0 until
    the first one ends) from ``in_progress`` on.
    """
    status = record["status"]
    phase = record.get("phase", SUBMITTED)
    training = record.get("progress") or {}
    progress: dict[str, Any] = {}
    staged = [d for d in (record.get("datasets") or {}).values() if d.get("delivery") == "staged"]
    if staged:
        progress["rows_staged"] = sum(int(d.get("rows_staged") or 0) for d in staged)
        progress["bytes_staged"] = sum(int(d.get("bytes_staged") or 0) for d in staged)
    if training or status != "scheduled" and phase == SUBMITTED:
        progress.update({"step": 0, **training})
    if is_terminal(record):
        progress["phase"] = "ended"
    elif phase in (STAGING, SUBMITTING):
        progress["phase"] = phase
    else:
        progress["phase"] = "training" if status == "in_progress" else "queued"
    return progress


def to_checkpoint(value: dict[str, Any]) -> KfpCheckpoint:
    """A pipeline checkpoint dict as llama-stack's ``Checkpoint``.

    llama-stack's metric type needs every number; without a validation dataset the pipeline
    has no validation loss, so the metrics are left out rather than invented.
    """
    metrics = value.get("training_metrics") or None
    needed = ("epoch", "train_loss", "validation_loss", "perplexity")
    if metrics and any(metrics.get(k) is None for k in needed):
        metrics = None
    return KfpCheckpoint(
        identifier=value["identifier"],
        created_at=value["created_at"],
        epoch=value["epoch"],
        post_training_job_id=value["post_training_job_id"],
        path=value["path"],
        training_metrics=metrics,
    )


class KfpTrainerPostTraining:
    """One instance per ``llama stack run``; built by :func:`provider.get_adapter_impl`."""

    def __init__(self, config: KfpTrainerConfig, datasetio: DatasetIO, datasets: Datasets) -> None:
        self.config = config
        self.datasetio_api = datasetio
        self.datasets_api = datasets
        self._store = JobStore(config.resolved_kvstore)
        self._transport: Transport = make_transport(config)
        self._refreshed: dict[str, float] = {}
        self._roots = config.roots()
        self._background = BackgroundJobs()
        self._submission = Submission(config, self._store, self._transport, datasetio)

    # -- lifecycle ---------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the job store, start the transport, catch up on jobs that moved while down."""
        logs.configure(self.config.log_format)
        tracing.init(SERVICE_NAME)
        self.config.state_path.mkdir(parents=True, exist_ok=True)
        self._store.start()
        self._transport.start(self._on_update)
        self._background.open()
        log.info(
            "kfp-torchtune provider ready",
            extra={"mode": self.config.mode, "state_dir": self.config.state_dir},
        )
        await self._reconcile()

    async def shutdown(self) -> None:
        await self._background.stop()  # their records say where to go on at the next start
        self._transport.stop()
        self._store.stop()
        tracing.shutdown()

    async def health(self) -> HealthResponse:
        """OK when the handler can take work (in-process service or remote /readyz)."""
        problems = await asyncio.to_thread(self._transport.problems)
        if problems:
            return HealthResponse(status=HealthStatus.ERROR, message="; ".join(problems))
        return HealthResponse(status=HealthStatus.OK)

    def _on_update(self, update: dict[str, Any]) -> None:
        """Called from the transport's threads for every status event."""
        self._store.apply_soon(update)

    async def _reconcile(self) -> None:
        """Go on with jobs this process left staging or submitting. Local: ask the in-process
        handler about every job this copy thinks is running (events may have been emitted
        while this process was down). Remote reads refresh lazily."""
        for record in await self._store.all():
            if is_terminal(record):
                continue
            job_uuid = record["job_uuid"]
            if record.get("phase") in (STAGING, SUBMITTING):
                log.info("staging the job again after a restart", extra={"job_uuid": job_uuid})
                await self._background.start(job_uuid, self._submission.run(job_uuid))
            elif not self._transport.polls:
                await self._refresh(job_uuid, force=True)

    async def _refresh(self, job_uuid: str, *, force: bool = False) -> None:
        """Fold the handler's current view of a job into the store (throttled)."""
        last = self._refreshed.get(job_uuid, 0.0)
        if not force and time.monotonic() - last < self.config.status_refresh_s:
            return
        self._refreshed[job_uuid] = time.monotonic()
        try:
            view = await asyncio.to_thread(self._transport.job, job_uuid)
        except DeliveryFailed as exc:
            log.warning("status refresh failed", extra={"job_uuid": job_uuid, "error": str(exc)})
            return
        if view is not None:
            await self._store.apply(view, {"handler_note": None})
            return
        # A 404 (or, above, a 5xx or no answer) never ends a job: the handler answers 404 for a
        # request the Broker has not delivered yet as well as for one it dead-lettered, and the
        # answer may change. Past lost_after_s the status says so, and stays revisable.
        record = await self._store.get(job_uuid)
        if (
            record
            and self._transport.polls
            and not is_terminal(record)
            and _age_s(record) > self.config.lost_after_s
        ):
            note = (
                f"the handler has no record of job {job_uuid!r} "
                f"{self.config.lost_after_s:.0f}s after it was sent: the Broker has not "
                "delivered it yet, or the handler refused it (its dead-letter sink has the "
                "reason); the status changes as soon as the handler knows the job"
            )
            await self._store.apply(
                {"job_uuid": job_uuid, "status": record["status"]}, {"handler_note": note}
            )

    # -- supervised_fine_tune ----------------------------------------------------------------

    async def supervised_fine_tune(
        self,
        job_uuid: str,
        training_config: TrainingConfig,
        hyperparam_search_config: dict[str, Any],
        logger_config: dict[str, Any],
        model: str | None = None,
        checkpoint_dir: str | None = None,
        algorithm_config: AlgorithmConfig | None = None,
    ) -> PostTrainingJob:
        """Start the job's trace (llama-stack's request span continued) and emit the request."""
        with tracing.span(
            TRACER,
            "supervised_fine_tune",
            parent=request_context(),
            attributes={"job_uuid": job_uuid, "model": model},
        ):
            return await self._fine_tune(
                job_uuid,
                training_config,
                hyperparam_search_config,
                logger_config,
                model=model,
                checkpoint_dir=checkpoint_dir,
                algorithm_config=algorithm_config,
            )

    async def _fine_tune(
        self,
        job_uuid: str,
        training_config: TrainingConfig,
        hyperparam_search_config: dict[str, Any],
        logger_config: dict[str, Any],
        *,
        model: str | None,
        checkpoint_dir: str | None,
        algorithm_config: AlgorithmConfig | None,
    ) -> PostTrainingJob:
        request = build_request(
            self.config,
            job_uuid=job_uuid,
            model=model,
            training_config=training_config,
            algorithm_config=algorithm_config,
            hyperparam_search_config=hyperparam_search_config,
            logger_config=logger_config,
            checkpoint_dir=checkpoint_dir,
        )
        data_config = training_config.data_config
        assert data_config is not None  # build_request checked it
        data_format = data_config.data_format.value
        wanted = [("dataset", data_config.dataset_id)]
        if data_config.validation_dataset_id:
            wanted.append(("validation_dataset", data_config.validation_dataset_id))
        plans = [await self._plan(field, dataset_id, data_format) for field, dataset_id in wanted]

        digest = ingress.digest(request)
        record = {
            "job_uuid": job_uuid,
            "status": "scheduled",
            "requested_at": now_iso(),
            "model": model,
            "dataset_id": data_config.dataset_id,
            "validation_dataset_id": data_config.validation_dataset_id,
            "request_digest": digest,
            "request": request,
            "data_format": data_format,
            "plans": [p.to_dict() for p in plans],
            "datasets": {p.field: _dataset_view(p) for p in plans},
            "phase": STAGING,
            # The distributed-tracing extension: the handler continues this span's trace.
            "trace": tracing.carrier(),
        }
        if not await self._store.create(record):
            return await self._again(job_uuid, digest)
        if any(p.delivery == "staged" for p in plans):
            await self._background.start(job_uuid, self._submission.run(job_uuid))
            log.info("job accepted; staging its datasets", extra={"job_uuid": job_uuid})
            return PostTrainingJob(job_uuid=job_uuid)
        # Every dataset by reference: nothing to wait for, so the handler answers this call.
        for p in plans:
            request[p.field] = {"uri": p.uri, "format": p.format, "dataset_id": p.dataset_id}
        try:
            await self._store.patch(job_uuid, {"phase": SUBMITTING})
            await self._submission.submit(job_uuid, request, record["trace"])
        except BaseException:
            await self._store.delete(job_uuid)
            raise
        return PostTrainingJob(job_uuid=job_uuid)

    async def _again(self, job_uuid: str, digest: str) -> PostTrainingJob:
        """The answer to a call for a job_uuid that exists: a client's retry of the same call
        gets the first answer; other settings are refused."""
        existing = await self._store.get(job_uuid) or {}
        if existing.get("request_digest") == digest:
            log.info("a retried request answered again", extra={"job_uuid": job_uuid})
            return PostTrainingJob(job_uuid=job_uuid)
        raise ValueError(
            f"job_uuid {job_uuid!r}: a job with this job_uuid already exists with other "
            "settings; send the same settings again to get that job, or pick a new job_uuid"
        )

    async def _plan(self, field: str, dataset_id: str, data_format: str) -> DatasetPlan:
        """How one dataset reaches the trainer, after every check that needs no reading.

        :raises ValueError: not registered, the wrong purpose, a source that is not a file,
            a bad row in sight (each naming the dataset id).
        """
        name = f"{field}_id"
        try:
            dataset = await self.datasets_api.get_dataset(dataset_id)
        except ValueError:
            dataset = None
        if dataset is None:
            raise ValueError(
                f"training_config.data_config.{name}: dataset {dataset_id!r} is not registered; "
                "register it first (client.datasets.register)"
            )
        require_purpose(dataset, name)
        chosen = plan(
            dataset,
            field,
            mode=self.config.mode,
            roots=self._roots,
            reader=self.config.dataset_reader,
        )
        await asyncio.to_thread(check_in_sight, dataset, chosen, data_format)
        return chosen

    async def preference_optimize(
        self,
        job_uuid: str,
        finetuned_model: str,
        algorithm_config: DPOAlignmentConfig,
        training_config: TrainingConfig,
        hyperparam_search_config: dict[str, Any],
        logger_config: dict[str, Any],
    ) -> PostTrainingJob:
        raise NotImplementedError(
            f"preference_optimize (DPO) is not supported by {ADAPTER}; "
            "use supervised_fine_tune with a LoRA algorithm_config"
        )

    # -- reads -------------------------------------------------------------------------------

    async def _record(self, job_uuid: str) -> dict[str, Any]:
        record = await self._store.get(job_uuid)
        if record is None:
            raise JobNotFound(
                f"job {job_uuid!r} not found; GET /v1/post-training/jobs lists the known jobs"
            )
        if (
            self._transport.polls
            and not is_terminal(record)
            and record.get("phase", SUBMITTED) == SUBMITTED
        ):
            await self._refresh(job_uuid)
            record = await self._store.get(job_uuid) or record
        return record

    async def get_training_jobs(self) -> ListPostTrainingJobsResponse:
        records = await self._store.all()
        return ListPostTrainingJobsResponse(
            data=[PostTrainingJob(job_uuid=r["job_uuid"]) for r in records]
        )

    async def get_training_job_status(self, job_uuid: str) -> KfpJobStatusResponse:
        record = await self._record(job_uuid)
        return KfpJobStatusResponse(
            job_uuid=job_uuid,
            status=to_job_status(record["status"]),
            scheduled_at=record.get("scheduled_at") or record.get("requested_at"),
            started_at=record.get("started_at"),
            completed_at=record.get("completed_at"),
            resources_allocated=record.get("resources_allocated") or None,
            checkpoints=[to_checkpoint(c) for c in record.get("checkpoints") or []],
            progress=job_progress(record),
            error=record.get("error") or record.get("handler_note"),
            dataset_rows=record.get("dataset_rows"),
            rows_without_trainable_tokens=record.get("rows_without_trainable_tokens"),
            datasets=record.get("datasets"),
        )

    async def get_training_job_artifacts(self, job_uuid: str) -> KfpJobArtifactsResponse:
        record = await self._record(job_uuid)
        return KfpJobArtifactsResponse(
            job_uuid=job_uuid,
            checkpoints=[to_checkpoint(c) for c in record.get("checkpoints") or []],
        )

    async def cancel_training_job(self, job_uuid: str) -> None:
        """Emit ``job.cancel.requested``; the job turns ``cancelled`` when the handler says so."""
        from handler.contract import JOB_CANCEL_REQUESTED, make_event

        record = await self._record(job_uuid)
        if is_terminal(record):
            log.info("cancel of a finished job ignored", extra={"job_uuid": job_uuid})
            return None
        if record.get("phase") in (STAGING, SUBMITTING):
            # Marked in the store, where the staging task moves on to submitting only when
            # no cancel is marked: the phase read here is the one that task acts on.
            marked = await self._store.change(job_uuid, _mark_cancel) or record
            if marked.get("phase") == STAGING:
                if not await self._background.cancel(job_uuid):
                    await self._submission.end(job_uuid, "cancelled", None)
                return None
            await self._background.wait(job_uuid)  # a job.requested in flight: let it land
            record = await self._store.get(job_uuid) or record
            if is_terminal(record):
                return None
        event = make_event(
            JOB_CANCEL_REQUESTED,
            self.config.source,
            {"job_uuid": job_uuid},
            time=datetime.now(UTC),
        )
        for update in await asyncio.to_thread(self._transport.send, event):
            await self._store.apply(update)
        await self._store.apply(
            {"job_uuid": job_uuid, "status": record["status"]},
            {"cancel_requested_at": now_iso()},
        )
        return None
