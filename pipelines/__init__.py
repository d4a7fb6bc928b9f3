"""KFP pipeline and torchtune LoRA training component: one definition for local and remote runs.

Importing this package is cheap (no kfp, no torch). The modules the handler uses:
``settings`` (PipelineSettings), ``validation`` (check_request), ``staging`` (resolve_model_uri),
``pipeline`` (build_pipeline, compile_pipeline, pipeline_arguments), ``local`` (run_request),
``result`` (RunResult) and ``cli`` (register). Every process that trains imports this package
first, so it is where torchao's harmless triton notice is taken out (``torchao_notice``).
"""

from pipelines import torchao_notice

torchao_notice.install()
