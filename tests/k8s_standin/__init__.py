"""A Kubernetes API stand-in for tests: TokenReview and DSPA reads over HTTPS (see README.md)."""

from tests.k8s_standin.server import API_AUDIENCES, TOKENREVIEWS, KubeApiStandin
from tests.k8s_standin.tokens import TokenInvalid, TokenIssuer

__all__ = ["API_AUDIENCES", "TOKENREVIEWS", "KubeApiStandin", "TokenInvalid", "TokenIssuer"]
