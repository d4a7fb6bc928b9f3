"""A stand-in for the Kubeflow Pipelines API server, for tests: the v2beta1 REST, run for real."""

from tests.kfp_standin.server import KfpStandin

__all__ = ["KfpStandin"]
