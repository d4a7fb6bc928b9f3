"""Local transport: the handler runs inside ``llama stack run`` and gets the same HTTP message.

``send`` encodes the event with the contract's binary binding and passes it to
``LocalService.handle`` (the function the Flask view calls), so local mode exercises the very
ingress remote mode does: parsing, validation, dedupe, the store and the reply. Status comes
back through ``LocalService.subscribe``, which hands over every event the handler emits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from provider.config import KfpTrainerConfig
from provider.transport import Answer, Update, deliver


def handler_env(config: KfpTrainerConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The environment the in-process handler is configured from: the process environment
    (so every handler knob still works) with the provider's own settings on top."""
    merged = dict(env)
    merged.update(
        {
            "KFP_TRAINER_MODE": "local",
            "KFP_TRAINER_STATE_DIR": config.state_dir,
            "KFP_TRAINER_MODEL_STORE": config.resolved_model_store,
            "KFP_TRAINER_DATA_ROOTS": config.data_roots,
            "KFP_TRAINER_CHECKPOINT_FORMAT": config.checkpoint_format,
            "KFP_TRAINER_ACCELERATOR_COUNT": str(config.gpu.gpu_count if config.gpu.use_gpu else 0),
            "KFP_TRAINER_ACCELERATOR_TYPE": config.gpu.accelerator_type,
        }
    )
    if config.base_image:
        merged["KFP_TRAINER_BASE_IMAGE"] = config.base_image
    return merged


class LocalTransport:
    """Owns the in-process :class:`handler.service.LocalService`."""

    polls = False

    def __init__(self, config: KfpTrainerConfig) -> None:
        self._config = config
        self._service: Any = None

    def start(self, on_update: Callable[[Update], object]) -> None:
        from handler import contract
        from handler.service import create_service
        from handler.settings import HandlerSettings

        settings = HandlerSettings.from_env(handler_env(self._config, os.environ))

        def on_event(event: Any) -> None:
            if event.get_type() in contract.EMITTED_TYPES:
                on_update(contract.event_data(event))

        service = create_service(settings)
        service.subscribe(on_event)
        service.start()
        self._service = service

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None

    def _running(self) -> Any:
        if self._service is None:
            raise RuntimeError("the in-process handler is not started")
        return self._service

    def send(self, event: Any) -> list[Update]:
        """Hand the binary-mode HTTP message to the handler's ingress; retry a 503."""
        from handler import contract

        message = contract.to_http(event)
        service = self._running()

        def once() -> Answer:
            reply = service.handle(message)
            return Answer(reply.status, reply.headers, reply.body)

        return deliver(
            once,
            attempts=self._config.delivery_attempts,
            backoff_s=self._config.delivery_backoff_s,
            what=f"{event.get_type()} for job {event.get_subject()!r} to the in-process handler",
        )

    def publish(self, event: Any) -> None:
        """Through the in-process handler's outbox: to its sink and to this provider."""
        self._running().publish(event)

    def job(self, job_uuid: str) -> Update | None:
        return self._running().job(job_uuid)

    def problems(self) -> list[str]:
        if self._service is None:
            return ["the in-process handler is not started"]
        return [f"{part}: {why}" for part, why in self._service.readiness().items()]
