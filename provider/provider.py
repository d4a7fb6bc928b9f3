"""The provider spec in Python: ``get_provider_spec()``, where newer llama-stack looks for it.

llama-stack 0.2.12 reads providers.d/remote/post_training/kfp-torchtune.yaml; later versions
import ``<module>.provider`` and call this function. Both forms describe one provider, and a test
keeps them equal, so neither can drift (module, config_class, dependencies).
"""

from __future__ import annotations

from llama_stack.providers.datatypes import AdapterSpec, Api, ProviderSpec, remote_provider_spec

ADAPTER_TYPE = "kfp-torchtune"


def get_provider_spec() -> ProviderSpec:
    """``remote::kfp-torchtune`` for post_training, reading datasets through datasetio."""
    return remote_provider_spec(
        api=Api.post_training,
        adapter=AdapterSpec(
            adapter_type=ADAPTER_TYPE,
            pip_packages=["llama-stack-provider-kfp-trainer"],
            config_class="provider.config.KfpTrainerConfig",
            module="provider",
        ),
        api_dependencies=[Api.datasetio, Api.datasets],
    )
