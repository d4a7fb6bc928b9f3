"""The roots a request to this handler may name, from its settings (pipelines/roots.py checks).

Local mode: the state dir, the model store and ``KFP_TRAINER_DATA_ROOTS``. Remote mode: the
configured bucket and prefix, the model store and ``KFP_TRAINER_DATA_ROOTS``. The same roots go
to the train task, which checks again before it opens anything.
"""

from __future__ import annotations

from handler.settings import HandlerSettings
from pipelines.roots import Roots


def allowed_roots(settings: HandlerSettings, model_store: str = "") -> Roots:
    """This deployment's roots; ``model_store``: the store in use when settings name none."""
    store = settings.model_store or model_store
    if settings.mode == "remote":
        remote = settings.remote
        return Roots.remote(remote.s3_bucket, remote.s3_prefix, store, settings.data_roots)
    return Roots.local(settings.state_dir, store, settings.data_roots)


__all__ = ["allowed_roots"]
