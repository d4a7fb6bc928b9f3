"""llama-stack ``remote::kfp-torchtune`` post_training provider: LoRA jobs as CloudEvents.

Importing this package is cheap: the implementation (and everything it pulls in) is imported
inside the entry point, when llama-stack instantiates the provider.
"""

from __future__ import annotations

from typing import Any


async def get_adapter_impl(config: Any, deps: dict[Any, Any]) -> Any:
    """Build and initialize the provider; llama-stack 0.2.12 calls this for ``remote::`` specs.

    ``deps`` holds the datasetio router and the datasets routing table (the spec's
    api_dependencies); they are the only way the provider reads training data.
    """
    from llama_stack.providers.datatypes import Api

    from provider.impl import KfpTrainerPostTraining

    impl = KfpTrainerPostTraining(config, deps[Api.datasetio], deps[Api.datasets])
    await impl.initialize()
    return impl


# Inline-style name for the same entry point (llama-stack's loaders differ by spec kind).
get_provider_impl = get_adapter_impl
