"""Whether a new job.requested can run: the pipeline's own checks, then its model resolved.

Both services admit requests the same way (local mode before queueing, remote mode before
creating a KFP run); only what happens after differs. The schema check is the contract's and
already happened in ingress.
"""

from __future__ import annotations

import time
from typing import Any, Final

from handler import logs
from handler.errors import BadRequest, Unavailable
from handler.roots import allowed_roots
from handler.settings import HandlerSettings
from pipelines.pipeline import ROOTS_FIELD

log = logs.get("handler.admission")

# How long a model name's resolved artifact is reused (a lookup may be an S3 round trip). Only
# hits are kept: a model uploaded after a miss is found by the next request.
MODEL_CACHE_S: Final = 10.0


class Admission:
    """``check`` (no I/O) and ``resolve`` (may search the model store) for new requests."""

    def __init__(self, settings: HandlerSettings, default_model_store: str = "") -> None:
        """:param default_model_store: where model names resolve when KFP_TRAINER_MODEL_STORE
        is empty (remote: where ``kfp-trainer upload-model`` puts models)."""
        self.settings = settings
        self.model_store = settings.model_store or default_model_store
        self.roots = allowed_roots(settings, default_model_store)
        self._models: dict[str, tuple[float, str]] = {}  # model -> (until, artifact uri)

    def check(self, data: dict[str, Any]) -> None:
        """:raises BadRequest: a URI outside this deployment's roots (checked first: nothing
        outside them is looked at), else every problem ``check_request`` finds."""
        from pipelines.validation import check_request

        outside = self.roots.request_problems(data)
        if outside:
            raise BadRequest(outside)
        problems = check_request(data)
        if problems:
            raise BadRequest(problems)

    def resolve(self, data: dict[str, Any]) -> dict[str, Any]:
        """The request as it will run: ``model_artifact.uri`` filled from the model store, and
        the roots the train task checks every URI against again (``ROOTS_FIELD``).

        :raises BadRequest: the model is not in the store, or the store says no for good.
        :raises Unavailable: the store cannot be searched right now.
        """
        return {**self._with_model(data), ROOTS_FIELD: list(self.roots.entries)}

    def _with_model(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("model_artifact"):
            return data
        from pipelines.staging import StagingError, resolve_model_uri

        model = data["model"]
        now = time.monotonic()
        cached = self._models.get(model)
        if cached is not None and cached[0] > now:
            return {**data, "model_artifact": {"uri": cached[1]}}
        store = self.model_store
        try:
            uri = resolve_model_uri(model, store)
        except StagingError as exc:  # not there, or the store said no (bucket, access): for good
            raise BadRequest(f"model_artifact: not given and not resolvable: {exc}") from None
        except OSError as exc:  # pipelines' StorageUnavailable is a ConnectionError: not now
            log.warning(
                "model store unavailable",
                extra={"model": model, "model_store": store, "problem": str(exc)},
            )
            raise Unavailable(
                f"model_artifact: not given, and model store {store!r} could not be searched "
                f"for model {model!r} right now; retry later"
            ) from None
        self._models[model] = (now + MODEL_CACHE_S, uri)
        return {**data, "model_artifact": {"uri": uri}}

    def admit(self, data: dict[str, Any]) -> dict[str, Any]:
        """``check`` then ``resolve``."""
        self.check(data)
        return self.resolve(data)
