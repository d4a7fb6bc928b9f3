"""Where the bearer token for the KFP API comes from, re-read on every client rebuild.

Order: a static token (``KFP_TOKEN``, from a Secret), else the service account's projected token
file (``KF_PIPELINES_SA_TOKEN_PATH``, rotated by the kubelet), else the current kubeconfig
context's token (what ``oc login`` writes; ``KUBECONFIG`` as the kubernetes client reads it),
else none (a port-forwarded API server without auth). The value never reaches a log or a repr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from handler.settings import RemoteSettings


class TokenError(RuntimeError):
    """A configured token source cannot be read; the message names the source, not the value."""


@dataclass(frozen=True)
class Token:
    """A bearer token and, for messages, where it came from."""

    source: str
    value: str = field(default="", repr=False)


def read_token(remote: RemoteSettings) -> Token:
    """Read the token afresh from the first configured source.

    :raises TokenError: the service-account token file is configured but unreadable or empty.
    """
    if remote.kfp_token:
        return Token("KFP_TOKEN", remote.kfp_token.strip())
    if remote.sa_token_path:
        path = Path(remote.sa_token_path)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TokenError(
                f"cannot read the service-account token KF_PIPELINES_SA_TOKEN_PATH={path}: "
                f"{exc.strerror or exc}"
            ) from None
        if not value:
            raise TokenError(f"the service-account token file {path} is empty")
        return Token(f"service-account token file {path}", value)
    value = _kubeconfig_token()
    if value:
        return Token("kubeconfig", value)
    return Token("none")


def kubeconfig_path() -> str | None:
    """``KUBECONFIG`` as it is now (the kubernetes client freezes it when first imported)."""
    return os.environ.get("KUBECONFIG") or None


def _kubeconfig_token() -> str:
    """The current kubeconfig context's bearer token, or "" when there is none."""
    try:
        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:  # pragma: no cover - kfp depends on kubernetes
        return ""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_kube_config(
            config_file=kubeconfig_path(), client_configuration=configuration, persist_config=False
        )
    except (ConfigException, OSError, TypeError, ValueError):
        return ""
    header = configuration.api_key.get("authorization", "")
    return header.removeprefix("Bearer ").strip()
