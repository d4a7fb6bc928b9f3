"""The callers knative/ sets up, on loopback: their tokens, and the API server vouching for them.

With Knative's ``authentication-oidc`` on, each Trigger and the PingSource send a token of their
own service account for the handler's audience, and the llama-stack server reads with its own.
:class:`Callers` runs the Kubernetes API stand-in the handler asks (TokenReview) and hands out
the token each of those senders would present, chosen from the manifests themselves.
"""

from __future__ import annotations

from pathlib import Path

from handler import contract
from tests.k8s_standin import KubeApiStandin
from tests.knative import manifests as m


class Callers:
    """The API stand-in and the senders' tokens; ``overrides()`` points the handler at it."""

    def __init__(self, work: Path) -> None:
        self.api = KubeApiStandin(work / "kube-api").start()
        spec = m.handler_service().body["spec"]["template"]["spec"]
        self.api.grant_token_review(
            f"system:serviceaccount:{m.namespace()}:{spec['serviceAccountName']}"
        )
        self.token_file = work / "handler-token"
        self.token_file.write_text(
            self.api.service_account_token(m.namespace(), spec["serviceAccountName"])
        )

    def overrides(self) -> dict[str, str]:
        """Where the pod's API server, own token and cluster CA are, on loopback."""
        return {
            "KFP_TRAINER_AUTH_API_URL": self.api.url,
            "KFP_TRAINER_AUTH_TOKEN_PATH": str(self.token_file),
            "KFP_TRAINER_AUTH_CA_PATH": str(self.api.ca_file),
        }

    def for_event(self, event_type: str) -> dict[str, str]:
        """The Authorization header of the sender that delivers ``event_type`` to the handler:
        the Trigger filtering on it, the PingSource for the tick, else the requests' Trigger
        (for events no Trigger routes, which only a listed caller gets as far as to refuse)."""
        senders = m.handler_senders()
        for doc, destination in senders:
            types = m.trigger_types(doc) if doc.kind == "Trigger" else [contract.PING]
            if event_type in types:
                return self._bearer(m.oidc_account(doc), destination["audience"])
        requests_doc, destination = next(
            (d, dest) for d, dest in senders if contract.JOB_REQUESTED in m.trigger_types(d)
        )
        return self._bearer(m.oidc_account(requests_doc), destination["audience"])

    def reader(self) -> dict[str, str]:
        """The llama-stack server's header for GET /jobs (the first listed reader)."""
        env = m.config_map_data()
        reader = env["KFP_TRAINER_AUTH_READERS"].split(",")[0].strip()
        _, _, namespace, name = reader.split(":")
        return self._bearer((namespace, name), env["KFP_TRAINER_AUTH_AUDIENCE"])

    def _bearer(self, account: tuple[str, str], audience: str) -> dict[str, str]:
        token = self.api.service_account_token(*account, audiences=[audience])
        return {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self.api.close()
