"""Fixtures for handler/ tests: a fresh app per test over a temp state dir (Flask tutorial style),
the tiny model in a model store, a dataset, a recording sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from handler import EXTENSION, create_app
from handler.service import LocalService
from handler.settings import HandlerSettings
from tests.support.jobs import make_tiny_model, write_dataset
from tests.support.sink import Sink

FAKE_BACKEND = "tests.handler.backends_for_tests:FakeRunLocalBackend"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the project's tiny random-weight model (``kfp-trainer tiny-model``)."""
    store = tmp_path_factory.mktemp("models")
    make_tiny_model(store / "llama3.2-tiny", timeout=180)
    return store


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data" / "train.jsonl")


@pytest.fixture
def env(tmp_path: Path, model_store: Path) -> dict[str, str]:
    """The environment a test handler runs with (tests add to it)."""
    return {
        "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
        "KFP_TRAINER_MODEL_STORE": str(model_store),
        "KFP_TRAINER_DATA_ROOTS": str(tmp_path / "data"),  # where the dataset fixture writes
        "KFP_TRAINER_BACKEND": "noop",
        "KFP_TRAINER_PROGRESS_INTERVAL_S": "0",
        "KFP_TRAINER_DELIVERY_BACKOFF_S": "0.1",
        "KFP_TRAINER_DELIVERY_BACKOFF_MAX_S": "0.5",
        "KFP_TRAINER_RETRY_AFTER_S": "7",
    }


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Build apps from an env mapping; their services are stopped at teardown."""
    apps: list[Flask] = []

    def make(env: dict[str, str], **extra: Any) -> Flask:
        app = create_app(HandlerSettings.from_env({**env, **extra}))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions[EXTENSION].stop(timeout=5)


@pytest.fixture
def app(make_app: Callable[..., Flask], env: dict[str, str]) -> Flask:
    return make_app(env)


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def service(app: Flask) -> LocalService:
    return app.extensions[EXTENSION]


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s
