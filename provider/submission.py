"""A job's way to the handler, after the call returned: stage, send ``job.requested``, or end.

The job's record says where it is (``phase``):

- ``staging``: its staged datasets are being copied (progress: rows and bytes so far);
- ``submitting``: every dataset is ready, ``job.requested`` is being sent;
- ``submitted``: the handler took it; from here on its events tell the job's story;
- ``ended``: it ended here, before the handler heard of it (a bad row, a source that cannot be
  read, the handler refusing it, a cancel during staging); this provider emitted the
  ``job.failed`` or ``job.cancelled`` itself, to where the handler's events go.

:meth:`Submission.run` does all of it from the record alone, so it starts again after a
restart of ``llama stack run`` (a staged copy is written again from the start; the handler
takes a resent ``job.requested`` with the same content as the first).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

from handler.contract import JOB_CANCELLED, JOB_FAILED, JOB_REQUESTED, make_event
from provider import logs
from provider.config import KfpTrainerConfig
from provider.datasets import DatasetPlan, local_source
from provider.staging import FileSink, Sink, StagedDataset, stage_dataset, stage_file
from provider.state import JobStore, now_iso
from provider.transport import DeliveryFailed, RequestRejected, Transport

log = logs.get("provider.submission")

STAGING: Final = "staging"
SUBMITTING: Final = "submitting"
SUBMITTED: Final = "submitted"
ENDED: Final = "ended"
# Staged copies are named by field: <job>/train.jsonl, <job>/validation.jsonl.
_STAGED_NAME: Final = {"dataset": "train", "validation_dataset": "validation"}
# Progress is written to the job's record at most this often (and after the last page).
PROGRESS_EVERY_S: Final = 0.5


class Submission:
    """Stages and submits jobs for one provider instance."""

    def __init__(
        self,
        config: KfpTrainerConfig,
        store: JobStore,
        transport: Transport,
        datasetio: Any,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.datasetio = datasetio

    # -- the whole way ---------------------------------------------------------------------

    async def run(self, job_uuid: str) -> None:
        """Stage what needs staging, send ``job.requested``; end the job when that fails.

        A cancel during staging ends it ``cancelled``; a cancel by shutdown leaves the record
        as it is, for the next start.
        """
        try:
            await self._run(job_uuid)
        except asyncio.CancelledError:
            record = await self.store.get(job_uuid)
            if record and record.get("cancel_requested_at") and record.get("phase") == STAGING:
                await self.end(job_uuid, "cancelled", None)
            raise
        except (ValueError, OSError) as exc:  # a bad dataset, S3, the handler said no, ...
            await self.end(job_uuid, "failed", str(exc))
        except Exception as exc:
            log.exception("staging failed unexpectedly", extra={"job_uuid": job_uuid})
            await self.end(job_uuid, "failed", f"{type(exc).__name__}: {exc}")

    async def _run(self, job_uuid: str) -> None:
        record = await self.store.get(job_uuid)
        if record is None or record.get("phase") not in (STAGING, SUBMITTING):
            return
        request = dict(record["request"])
        datasets = dict(record.get("datasets") or {})
        for raw in record["plans"]:
            plan = DatasetPlan.from_dict(raw)
            if plan.delivery == "by_reference":
                request[plan.field] = {
                    "uri": plan.uri,
                    "format": plan.format,
                    "dataset_id": plan.dataset_id,
                }
                continue
            staged = await self._stage(job_uuid, plan, record["data_format"])
            request[plan.field] = {**staged.ref(), "dataset_id": plan.dataset_id}
            datasets[plan.field] = {
                **datasets.get(plan.field, {}),
                "uri": staged.uri,
                "rows": staged.rows,
                "sha256": staged.sha256,
                "rows_staged": staged.rows,
                "bytes_staged": staged.size,
            }
            fields: dict[str, Any] = {"datasets": datasets}
            if plan.field == "dataset":
                fields["dataset_rows"] = staged.rows
            await self.store.patch(job_uuid, fields)
            log.info(
                "dataset staged",
                extra={"job_uuid": job_uuid, "dataset_id": plan.dataset_id, "rows": staged.rows},
            )

        def submitting(record: dict[str, Any]) -> None:
            if not record.get("cancel_requested_at"):
                record["phase"] = SUBMITTING

        if (await self.store.change(job_uuid, submitting) or {}).get("phase") != SUBMITTING:
            await self.end(job_uuid, "cancelled", None)  # cancelled as the last page landed
            return
        await self.submit(job_uuid, request, record.get("trace") or {})

    async def submit(self, job_uuid: str, request: dict[str, Any], trace: dict[str, str]) -> None:
        """Send ``job.requested`` and fold the handler's answer into the record.

        :raises RequestRejected: the handler refused it (the message says why).
        :raises DeliveryFailed: it could not be delivered.
        """
        event = make_event(JOB_REQUESTED, self.config.source, request, extensions=trace)
        updates = await asyncio.to_thread(self.transport.send, event)
        await self.store.patch(job_uuid, {"phase": SUBMITTED, "submitted_at": now_iso()})
        for update in updates:
            await self.store.apply(update)
        log.info("job requested", extra={"job_uuid": job_uuid})

    # -- staging -----------------------------------------------------------------------------

    def _sink(self, job_uuid: str, name: str) -> Sink:
        if self.config.mode == "remote":
            from provider.s3stage import S3MultipartSink, dataset_key, s3_client

            s3 = self.config.s3
            return S3MultipartSink(
                s3_client(s3),
                s3.bucket,
                dataset_key(s3, job_uuid, name),
                s3.part_size_mb * 1024 * 1024,
            )
        return FileSink(self.config.state_path / "datasets" / job_uuid / f"{name}.jsonl")

    async def _stage(self, job_uuid: str, plan: DatasetPlan, data_format: str) -> StagedDataset:
        sink = await asyncio.to_thread(self._sink, job_uuid, _STAGED_NAME[plan.field])
        reported = 0.0

        async def on_page(rows: int, size: int) -> None:
            nonlocal reported
            if time.monotonic() - reported < PROGRESS_EVERY_S:
                return
            reported = time.monotonic()

            def progress(record: dict[str, Any]) -> None:
                entry = record.setdefault("datasets", {}).setdefault(plan.field, {})
                entry.update(rows_staged=rows, bytes_staged=size)

            await self.store.change(job_uuid, progress)

        if plan.reader == "file":
            path = local_source(plan.uri or "")
            assert path is not None and plan.format is not None  # as planned
            return await stage_file(
                Path(path),
                plan.format,
                plan.dataset_id,
                sink,
                data_format=data_format,
                page_size=self.config.dataset_page_size,
                on_page=on_page,
            )
        return await stage_dataset(
            self.datasetio,
            plan.dataset_id,
            sink,
            data_format=data_format,
            page_size=self.config.dataset_page_size,
            page_max=self.config.dataset_page_max,
            source=repr(plan.uri) if plan.uri else "inline rows",
            on_page=on_page,
        )

    # -- ends before the handler -------------------------------------------------------------

    async def end(self, job_uuid: str, status: str, error: str | None) -> None:
        """End a job the handler never took, and emit its ``job.failed`` / ``job.cancelled``."""
        record = await self.store.apply(
            {"job_uuid": job_uuid, "status": status, "completed_at": now_iso(), "error": error},
            {"phase": ENDED},
        )
        log.info(
            "job ended before it was submitted",
            extra={"job_uuid": job_uuid, "status": status, "error": error},
        )
        data = {
            "job_uuid": job_uuid,
            "status": record["status"],
            "scheduled_at": record.get("requested_at"),
            "completed_at": record.get("completed_at"),
            "dataset_rows": record.get("dataset_rows"),
            "error": record.get("error"),
            "checkpoints": [],
        }
        kind = JOB_FAILED if status == "failed" else JOB_CANCELLED
        event = make_event(kind, self.config.source, data, extensions=record.get("trace") or {})
        try:
            await asyncio.to_thread(self.transport.publish, event)
        except (DeliveryFailed, RequestRejected) as exc:
            log.error(
                "could not emit the end of a job",
                extra={"job_uuid": job_uuid, "type": kind, "problem": str(exc)},
            )


__all__ = ["ENDED", "STAGING", "SUBMITTED", "SUBMITTING", "Submission"]
