"""How each registered dataset reaches the training task, decided at submit without reading it.

- **By reference**: the source is a URI the train task can open itself (a path or ``file://``
  in local mode, ``s3://`` or ``https://`` in remote mode), in CSV, JSONL or Parquet, inside
  the allowed roots (pipelines/roots.py). The URI goes to the pipeline as it is.
- **Staged**: anything else. A local CSV, JSONL or Parquet file outside the roots is read here
  (same row semantics as the trainer's); every other source (``rows``, ``data:`` URLs, xlsx,
  providers we cannot read) comes page by page through datasetio. Either way the rows are
  written to the state dir or the S3 bucket, which are inside the roots by construction.

What can be checked without reading the data is checked here, so a bad request is a 400 at
submit: the purpose, a local source that does not exist or is a directory, the rows that are
already in sight (inline ``rows``, the first rows of a local file).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote, urlparse

from pipelines.data import DatasetError, check_row, iter_rows, source_format
from pipelines.roots import Roots
from provider.staging import datasetio_row

PURPOSE: Final = "post-training/messages"
# How many rows of a local file are checked at submit: enough to catch a file of the wrong
# shape, few enough to cost a millisecond.
PEEK_ROWS: Final = 64
# Schemes the train task opens itself, per mode.
TRAINER_SCHEMES: Final[dict[str, tuple[str, ...]]] = {
    "local": ("", "file"),
    "remote": ("s3", "https"),
}

Delivery = Literal["by_reference", "staged"]
Reader = Literal["file", "datasetio"]


class DatasetRefused(DatasetError):
    """A registered dataset this job cannot use; a ``ValueError`` (llama-stack answers 400)."""


def local_source(uri: str) -> Path | None:
    """The path a local dataset URI (a path or ``file://``) names; None for anything else."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri).expanduser()
    return None


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of a job: where it comes from and how it reaches the train task."""

    field: str  # "dataset" or "validation_dataset"
    dataset_id: str
    delivery: Delivery
    reader: Reader | None = None  # staged only: read from the file here, or through datasetio
    uri: str | None = None  # the registered URI (None for inline rows)
    format: str | None = None  # csv, jsonl or parquet, when the file is read directly

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> DatasetPlan:
        return cls(**value)


def require_purpose(dataset: Any, field: str) -> None:
    """:raises DatasetRefused: the dataset was registered for something other than training."""
    purpose = getattr(dataset.purpose, "value", dataset.purpose)
    if purpose != PURPOSE:
        raise DatasetRefused(
            f"training_config.data_config.{field}: dataset {dataset.identifier!r} is registered "
            f"with purpose {purpose!r}; supervised_fine_tune needs {PURPOSE!r} (register it "
            "again with that purpose)"
        )


def plan(dataset: Any, field: str, *, mode: str, roots: Roots, reader: str = "auto") -> DatasetPlan:
    """How ``dataset`` reaches the train task (see the module docstring).

    :param reader: ``auto`` (the above), or ``datasetio``: every row through datasetio.
    """
    source = dataset.source
    if source.type != "uri":
        return DatasetPlan(field, dataset.identifier, "staged", "datasetio")
    uri = source.uri
    fmt = source_format(uri)
    if reader == "datasetio" or fmt is None:
        return DatasetPlan(field, dataset.identifier, "staged", "datasetio", uri)
    scheme = urlparse(uri).scheme
    if scheme in TRAINER_SCHEMES[mode] and roots.allows(uri):
        return DatasetPlan(field, dataset.identifier, "by_reference", None, uri, fmt)
    if local_source(uri) is not None:
        return DatasetPlan(field, dataset.identifier, "staged", "file", uri, fmt)
    return DatasetPlan(field, dataset.identifier, "staged", "datasetio", uri)


def check_in_sight(dataset: Any, chosen: DatasetPlan, data_format: str) -> None:
    """Check what can be seen of the rows without reading the dataset.

    :raises DatasetRefused: naming the dataset id and the path, or the row and column.
    """
    field = f"training_config.data_config.{chosen.field}_id"
    if chosen.uri is not None:
        path = local_source(chosen.uri)
        if path is not None and not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise DatasetRefused(
                f"{field}: dataset {chosen.dataset_id!r} is registered with {chosen.uri!r}, which "
                f"{what}; register it again with the path of a CSV, JSONL or Parquet file"
            )
        if path is None or chosen.format is None:
            return
        rows = islice(iter_rows(path, chosen.format, dataset=chosen.dataset_id), PEEK_ROWS)
        check: Any = check_row
    elif dataset.source.type == "rows":
        rows = iter(dataset.source.rows)
        check = datasetio_row  # what staging will do with them, through datasetio
    else:
        return
    try:
        for index, row in enumerate(rows):
            check(row, data_format, dataset=chosen.dataset_id, index=index)
    except DatasetError as exc:
        raise DatasetRefused(f"{field}: {exc}") from None


__all__ = [
    "PURPOSE",
    "DatasetPlan",
    "DatasetRefused",
    "check_in_sight",
    "local_source",
    "plan",
    "require_purpose",
]
