"""The provider is declared once: providers.d YAML, get_provider_spec() and run.yaml agree."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_spec_equals_python_spec() -> None:
    from llama_stack.distribution.distribution import get_provider_registry
    from llama_stack.providers.datatypes import Api

    from provider.provider import get_provider_spec

    registry = get_provider_registry(
        SimpleNamespace(external_providers_dir=str(ROOT / "providers.d"))
    )
    loaded = registry[Api.post_training]["remote::kfp-torchtune"]
    declared = get_provider_spec()
    assert loaded.model_dump() == declared.model_dump()
    assert loaded.provider_type == "remote::kfp-torchtune"
    assert [a.value for a in loaded.api_dependencies] == ["datasetio", "datasets"]


def test_spec_points_at_importable_entry_point_and_config() -> None:
    import importlib

    from provider.provider import get_provider_spec

    spec = get_provider_spec()
    module = importlib.import_module(spec.module)
    assert callable(module.get_adapter_impl)
    module_name, _, cls = spec.config_class.rpartition(".")
    assert getattr(importlib.import_module(module_name), cls).__name__ == "KfpTrainerConfig"


def _post_training_block() -> dict:
    run = yaml.safe_load((ROOT / "run.yaml").read_text())
    (entry,) = run["providers"]["post_training"]
    assert entry["provider_type"] == "remote::kfp-torchtune"
    return entry["config"]


def test_run_yaml_carries_the_sample_run_config() -> None:
    from provider.config import KfpTrainerConfig

    assert _post_training_block() == KfpTrainerConfig.sample_run_config()


def test_run_yaml_config_resolves_with_defaults_and_env(monkeypatch, tmp_path) -> None:
    from llama_stack.distribution.stack import replace_env_vars

    from provider.config import KfpTrainerConfig

    for name in ("KFP_TRAINER_MODE", "KFP_TRAINER_STATE_DIR", "KFP_TRAINER_MODEL_STORE"):
        monkeypatch.delenv(name, raising=False)
    default = KfpTrainerConfig(**replace_env_vars(_post_training_block()))
    assert default.mode == "local"
    assert default.state_dir == str(Path("~/.local/share/kfp-trainer").expanduser())
    assert default.resolved_model_store == default.state_dir + "/models"

    monkeypatch.setenv("KFP_TRAINER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("KFP_TRAINER_PAGE_SIZE", "7")
    monkeypatch.setenv("KFP_TRAINER_USE_GPU", "true")
    monkeypatch.setenv("KFP_TRAINER_ACCELERATOR_COUNT", "2")
    cfg = KfpTrainerConfig(**replace_env_vars(_post_training_block()))
    assert cfg.state_dir == str(tmp_path)
    assert cfg.dataset_page_size == 7
    assert (cfg.gpu.use_gpu, cfg.gpu.gpu_count) == (True, 2)
    assert cfg.resolved_kvstore.db_path == f"{tmp_path}/provider.db"


def test_remote_mode_names_every_missing_setting() -> None:
    from pydantic import ValidationError

    from provider.config import KfpTrainerConfig

    with pytest.raises(ValidationError) as info:
        KfpTrainerConfig(mode="remote", broker_url="http://broker")
    message = str(info.value)
    assert "handler_url (KFP_TRAINER_HANDLER_URL)" in message
    assert "s3.bucket (S3_BUCKET)" in message
    needs = message.split("needs", 1)[1].split("[type", 1)[0]
    assert "broker_url" not in needs


def test_bad_values_are_named() -> None:
    from pydantic import ValidationError

    from provider.config import KfpTrainerConfig

    with pytest.raises(ValidationError, match="checkpoint_format"):
        KfpTrainerConfig(checkpoint_format="safetensors")
    with pytest.raises(ValidationError, match="part_size_mb"):
        KfpTrainerConfig(s3={"part_size_mb": 1})
    with pytest.raises(ValidationError, match="mode"):
        KfpTrainerConfig(mode="cluster")


def test_importing_the_package_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, provider; "
        "heavy = [m for m in ('torch', 'llama_stack', 'kfp', 'flask') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
