"""Turn a ``supervised_fine_tune`` call into ``job.requested`` data, or say what is wrong.

Checks run before any dataset row is read: the provider's own rules (LoRA only, a model and a
data_config are needed, ``checkpoint_dir`` is the pipeline's business), then the event
contract's schema, then the pipeline's cheap config checks (known model, LoRA modules, ...).
Every problem names its field; the first layer that finds problems reports all of its own.
"""

from __future__ import annotations

import re
from typing import Any, Final

from llama_stack.apis.post_training import LoraFinetuningConfig, TrainingConfig

from provider.config import KfpTrainerConfig

ADAPTER: Final = "remote::kfp-torchtune"
# Datasets are staged after validation; a remote-looking placeholder keeps the pipeline's check
# from looking for a local file that does not exist yet.
_PENDING_DATASET: Final = {"uri": "s3://pending-staging/dataset.jsonl", "format": "jsonl"}
_JOB_UUID: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestInvalid(ValueError):
    """The request cannot be run as given; ``problems`` lists each, naming the field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _own_rules(
    job_uuid: str,
    model: str | None,
    training_config: TrainingConfig,
    algorithm_config: Any,
    checkpoint_dir: str | None,
) -> list[str]:
    problems: list[str] = []
    if not _JOB_UUID.match(job_uuid) or set(job_uuid) == {"."}:
        problems.append(
            f"job_uuid: {job_uuid!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
            "(and not only dots)"
        )
    if not model:
        problems.append("model: is required (a model name, e.g. 'Llama3.2-3B-Instruct')")
    if algorithm_config is None:
        problems.append("algorithm_config: is required (type 'LoRA')")
    elif not isinstance(algorithm_config, LoraFinetuningConfig):
        kind = getattr(algorithm_config, "type", type(algorithm_config).__name__)
        problems.append(
            f"algorithm_config.type: {kind!r} is not supported by {ADAPTER}; only 'LoRA' "
            "fine-tuning is"
        )
    if training_config.data_config is None:
        problems.append(
            "training_config.data_config: is required (dataset_id, batch_size, shuffle, "
            "data_format)"
        )
    if checkpoint_dir:
        problems.append(
            f"checkpoint_dir: not supported by {ADAPTER}; the pipeline stores checkpoints "
            "(local: under the state directory, remote: in S3) and the job's artifacts list "
            "their paths; leave it unset"
        )
    return problems


def build_request(
    config: KfpTrainerConfig,
    *,
    job_uuid: str,
    model: str | None,
    training_config: TrainingConfig,
    algorithm_config: Any,
    hyperparam_search_config: dict[str, Any] | None,
    logger_config: dict[str, Any] | None,
    checkpoint_dir: str | None,
) -> dict[str, Any]:
    """The job.requested data without dataset refs (added once staged).

    :raises RequestInvalid: listing every problem of the first layer that found any.
    """
    from handler.contract import JOB_REQUESTED, ContractError, validate_data
    from pipelines.validation import check_request

    problems = _own_rules(job_uuid, model, training_config, algorithm_config, checkpoint_dir)
    if problems:
        raise RequestInvalid(problems)
    request: dict[str, Any] = {
        "job_uuid": job_uuid,
        "model": model,
        "training_config": training_config.model_dump(mode="json", exclude_none=True),
        "algorithm_config": algorithm_config.model_dump(mode="json", exclude_none=True),
        "hyperparam_search_config": dict(hyperparam_search_config or {}),
        "logger_config": dict(logger_config or {}),
        "checkpoint_format": config.checkpoint_format,
        "resources": {"use_gpu": config.gpu.use_gpu, "gpu_count": config.gpu.gpu_count},
    }
    candidate = {**request, "dataset": dict(_PENDING_DATASET)}
    try:
        validate_data(JOB_REQUESTED, candidate)
    except ContractError as exc:
        raise RequestInvalid(exc.problems) from None
    problems = [p for p in check_request(candidate) if not p.startswith("dataset")]
    if problems:
        raise RequestInvalid(problems)
    return request
