"""Finding the KFP API of a Data Science Pipelines application (OpenShift AI / ODH).

A DataSciencePipelinesApplication publishes its API server's route in
``status.components.apiServer.externalUrl``; reading it from the custom resource means the
handler needs only the DSPA's name and namespace, as the original provider did.
"""

from __future__ import annotations

from typing import Any, Final

from handler.backends.base import BackendUnavailable
from handler.remote.auth import kubeconfig_path

DSPA_GROUP: Final = "datasciencepipelinesapplications.opendatahub.io"
DSPA_PLURAL: Final = "datasciencepipelinesapplications"
DSPA_VERSIONS: Final = ("v1", "v1alpha1")


class DiscoveryError(BackendUnavailable):
    """The DSPA cannot be read or has no URL yet; retried later, the message says why."""


def discover_host(namespace: str, name: str, *, timeout_s: float = 10.0) -> str:
    """``status.components.apiServer.externalUrl`` of DSPA ``name`` in ``namespace``.

    Uses the in-cluster service account when running in a pod, else the kubeconfig.

    :raises DiscoveryError: naming the DSPA and what is missing.
    """
    from kubernetes import client as k8s_client
    from kubernetes.client.rest import ApiException

    api = k8s_client.CustomObjectsApi(_kube_api_client())
    what = f"DataSciencePipelinesApplication {name!r} in namespace {namespace!r}"
    dspa: dict[str, Any] | None = None
    for version in DSPA_VERSIONS:
        try:
            dspa = api.get_namespaced_custom_object(
                DSPA_GROUP, version, namespace, DSPA_PLURAL, name, _request_timeout=timeout_s
            )
            break
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise DiscoveryError(f"cannot read {what}: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3 connection errors: the API server is unreachable
            raise DiscoveryError(f"cannot reach Kubernetes to read {what}: {exc}") from None
    if dspa is None:
        raise DiscoveryError(f"{what} not found (KFP_DSPA_NAME / KFP_NAMESPACE)")
    url = (dspa.get("status") or {}).get("components", {}).get("apiServer", {}).get("externalUrl")
    if not url:
        raise DiscoveryError(
            f"{what} has no status.components.apiServer.externalUrl yet (is it ready?)"
        )
    return str(url)


def _kube_api_client() -> Any:
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.config.config_exception import ConfigException

    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        try:
            k8s_config.load_kube_config(
                config_file=kubeconfig_path(),
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError) as exc:
            raise DiscoveryError(
                f"no Kubernetes credentials to discover the KFP host (set KFP_HOST): {exc}"
            ) from None
    return k8s_client.ApiClient(configuration)
