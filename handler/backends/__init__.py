"""Where local mode's runs execute: one base class, implementations chosen by one lookup."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Final

from handler.settings import HandlerSettings, SettingsError

if TYPE_CHECKING:
    from handler.backends.base import Backend
    from handler.store import JobStore

BACKENDS: Final[dict[str, str]] = {
    "local": "handler.backends.local:LocalBackend",
    "noop": "handler.backends.noop:NoopBackend",
    "hold": "handler.backends.noop:HoldBackend",
}


def load_backend(settings: HandlerSettings, store: JobStore) -> Backend:
    """Build the backend ``settings`` select: KFP_TRAINER_BACKEND if set, else ``local``.

    :raises SettingsError: the name is neither a known backend nor an importable
        ``module:Class``.
    """
    name = settings.backend or "local"
    spec = BACKENDS.get(name, name)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SettingsError(
            f"KFP_TRAINER_BACKEND={name!r}: expected one of {', '.join(BACKENDS)} "
            "or 'package.module:Class'"
        )
    try:
        cls = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"backend {name!r} ({spec}) cannot be loaded: {exc}") from exc
    return cls(settings, store)
