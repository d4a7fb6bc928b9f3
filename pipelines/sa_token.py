"""A bearer token for an audience, made for this task's pod by the Kubernetes API (TokenRequest).

The run-finished notice goes to a receiver that checks tokens for its own audience (the handler,
or the Broker with Knative's OIDC on). kfp-kubernetes 2.17 cannot mount a projected
service-account token into a task's pod, so the task asks for one as the kubelet does for a
projected volume: with the pod's own service-account token it requests a short-lived token for
its service account and that audience (``create`` on ``serviceaccounts/token``). The pod's
namespace and service account name come from the downward API, which kfp-kubernetes does set
(``use_field_path_as_env``, see pipelines/pipeline.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The pod's service-account files (token, ca.crt, namespace); KFP_TRAINER_SA_DIR elsewhere.
SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
# Set from the downward API by the pipeline (metadata.namespace, spec.serviceAccountName).
POD_NAMESPACE_ENV: Final = "KFP_TRAINER_POD_NAMESPACE"
POD_SERVICE_ACCOUNT_ENV: Final = "KFP_TRAINER_POD_SERVICE_ACCOUNT"
# The shortest lifetime the API grants; a token is asked for again a minute before it ends.
EXPIRATION_S: Final = 600
RENEW_BEFORE_S: Final = 60.0


class TokenUnavailable(RuntimeError):
    """No token could be had; the message names what is missing or who refused (never a token)."""


@dataclass(frozen=True)
class PodIdentity:
    """Where the API server is and who this pod is, as the pod sees it."""

    api_url: str
    namespace: str
    service_account: str
    token_path: Path  # the pod's own token: the credential for the TokenRequest
    ca_path: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PodIdentity:
        """:raises TokenUnavailable: not in a pod (no API address), or the pipeline did not pass
        the namespace and service account (the downward API env)."""
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "") or "443"
        sa_dir = Path(env.get("KFP_TRAINER_SA_DIR", "") or SA_DIR)
        namespace = env.get(POD_NAMESPACE_ENV, "")
        account = env.get(POD_SERVICE_ACCOUNT_ENV, "")
        missing = [
            name
            for name, value in (
                ("KUBERNETES_SERVICE_HOST", host),
                (POD_NAMESPACE_ENV, namespace),
                (POD_SERVICE_ACCOUNT_ENV, account),
            )
            if not value
        ]
        if missing:
            raise TokenUnavailable(
                f"cannot ask the Kubernetes API for a token: {', '.join(missing)} not set (the "
                "pipeline sets the last two from the downward API)"
            )
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        return cls(
            api_url=f"https://{host}:{port}",
            namespace=namespace,
            service_account=account,
            token_path=sa_dir / "token",
            ca_path=sa_dir / "ca.crt",
        )


def request_token(pod: PodIdentity, audience: str, timeout_s: float = 10.0) -> str:
    """A fresh token for ``pod``'s service account, valid for ``audience`` for EXPIRATION_S.

    :raises TokenUnavailable: the pod's own token is unreadable, the API is unreachable, or it
        refused (the message says which, with the permission a 403 lacks).
    """
    from kubernetes import client as k8s
    from urllib3.exceptions import HTTPError

    try:
        own = pod.token_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenUnavailable(
            f"cannot read the pod's service-account token {pod.token_path}: {exc.strerror or exc}"
        ) from None
    config = k8s.Configuration(host=pod.api_url)
    config.ssl_ca_cert = str(pod.ca_path)
    config.api_key = {"authorization": own}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.retries = False
    body = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=[audience], expiration_seconds=EXPIRATION_S)
    )
    where = f"serviceaccount {pod.namespace}/{pod.service_account} at {pod.api_url}"
    try:
        with k8s.ApiClient(config) as api_client:
            answer = k8s.CoreV1Api(api_client).create_namespaced_service_account_token(
                pod.service_account, pod.namespace, body, _request_timeout=timeout_s
            )
    except k8s.ApiException as exc:
        hint = (
            ": the service account needs `create` on `serviceaccounts/token` for itself "
            "(docs/deploy.md)"
            if exc.status == 403
            else ""
        )
        raise TokenUnavailable(f"TokenRequest for {where} answered {exc.status}{hint}") from None
    except (HTTPError, OSError) as exc:
        raise TokenUnavailable(
            f"TokenRequest for {where} failed: {type(exc).__name__}: {exc}"
        ) from None
    return answer.status.token


class AudienceToken:
    """The ``Authorization`` header for ``audience``: one token, asked for again before it ends.

    ``pod`` defaults to this process's pod, read from the environment when the first header is
    wanted, so a task that cannot get a token learns why where it would have sent one.
    """

    def __init__(
        self,
        audience: str,
        pod: PodIdentity | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audience = audience
        self._pod = pod
        self._clock = clock
        self._token = ""
        self._renew_at = 0.0

    def header(self) -> dict[str, str]:
        """:raises TokenUnavailable: as :meth:`PodIdentity.from_env` and :func:`request_token`."""
        if not self._token or self._clock() >= self._renew_at:
            if self._pod is None:
                self._pod = PodIdentity.from_env(os.environ)
            asked = self._clock()
            self._token = request_token(self._pod, self.audience)
            self._renew_at = asked + EXPIRATION_S - RENEW_BEFORE_S
        return {"Authorization": f"Bearer {self._token}"}


def bearer_for(audience: str) -> AudienceToken | None:
    """The token holder a task's posts use for ``audience``; None when no audience is set."""
    return AudienceToken(audience) if audience else None


__all__ = [
    "POD_NAMESPACE_ENV",
    "POD_SERVICE_ACCOUNT_ENV",
    "AudienceToken",
    "PodIdentity",
    "TokenUnavailable",
    "bearer_for",
    "request_token",
]
