"""A stand-in for the Kubeflow Pipelines API server, for tests: the v2beta1 REST, run for real."""

from tests.kfp_standin.server import KfpStandin
from tests.kfp_standin.simulated import Simulation

__all__ = ["KfpStandin", "Simulation"]
