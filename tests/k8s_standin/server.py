"""A Kubernetes API server on 127.0.0.1: TokenReview, TokenRequest and DSPA reads, over HTTPS.

Every request needs a bearer token the API server itself accepts: a static token (as
``--token-auth-file`` gives) or a service-account token from :attr:`KubeApiStandin.issuer`
valid for the API server's audiences. Creating a TokenReview also needs the permission
``system:auth-delegator`` grants (:meth:`KubeApiStandin.grant_token_review`), and requesting a
service account's token the ``create`` on its ``serviceaccounts/token`` a Role grants
(:meth:`KubeApiStandin.grant_token_request`); without them the answer is the API server's 403.
Answers are what ``kube-apiserver`` sends: ``201`` with the TokenReview and its ``status``
(``authenticated``, ``user``, ``audiences`` or ``error``) or the TokenRequest and its token, and
``Status`` objects for 400/401/403/404/422.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.k8s_standin.tokens import TokenInvalid, TokenIssuer
from tests.support.loopback import RestartableServer, TrackedHandler
from tests.support.tls import TlsFiles, make_tls

# What the API server's own tokens are issued for (``--api-audiences``; the issuer by default).
API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local", "https://kubernetes.default.svc")
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_TOKEN_REQUEST = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/serviceaccounts/(?P<name>[^/]+)/token$"
)
_DSPA = re.compile(
    r"^/apis/datasciencepipelinesapplications\.opendatahub\.io/(?P<version>[^/]+)"
    r"/namespaces/(?P<ns>[^/]+)/datasciencepipelinesapplications/(?P<name>[^/?]+)$"
)


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


class KubeApiStandin:
    """The API server: ``start()`` (or ``with``) serves, ``stop()`` is an outage on the same
    port, ``start()`` again comes back, ``close()`` ends it.

    :param directory: where its CA and certificate go (``ca_file`` is the cluster CA).
    :param tls: serve HTTPS (the default); False serves plain HTTP, for kubeconfig tests.
    """

    def __init__(self, directory: Path, *, tls: bool = True, dspa_version: str = "v1") -> None:
        self.issuer = TokenIssuer()
        self.tls: TlsFiles | None = make_tls(directory, "kube-apiserver") if tls else None
        self.dspa_version = dspa_version
        self.reviews: list[dict[str, Any]] = []  # every TokenReview spec received
        self.seen_auth: list[str | None] = []  # every Authorization header received
        self._static: dict[str, str] = {}  # token -> username
        self._reviewers: set[str] = set()
        self._token_requesters: set[tuple[str, str, str]] = set()  # (user, namespace, name)
        self.token_requests: list[dict[str, Any]] = []  # (namespace, name, spec) received
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        tls_files = (self.tls.cert, self.tls.key) if self.tls else None
        self._http = RestartableServer(_handler_class(self), tls=tls_files, name="kube-api")

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> KubeApiStandin:
        self._http.start()
        return self

    def stop(self) -> None:
        """Stop answering: new connections are refused and kept-alive ones are cut."""
        self._http.stop()

    close = stop

    def __enter__(self) -> KubeApiStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def ca_file(self) -> Path:
        assert self.tls is not None, "a plain-HTTP stand-in has no CA"
        return self.tls.ca

    # ---- what a test sets up ----------------------------------------------------------------

    def add_static_token(self, token: str, username: str) -> None:
        """A token the API server accepts for itself only (not audience-bound, never for others)."""
        self._static[token] = username

    def service_account_token(
        self,
        namespace: str,
        name: str,
        audiences: Iterable[str] = API_AUDIENCES,
        **kwargs: float,
    ) -> str:
        """A token from this cluster's issuer (``expires_in_s``, ``not_before_in_s``)."""
        return self.issuer.issue(namespace, name, tuple(audiences), **kwargs)

    def grant_token_review(self, username: str) -> None:
        """What binding ``system:auth-delegator`` to ``username`` allows: create TokenReviews."""
        self._reviewers.add(username)

    def revoke_token_review(self, username: str) -> None:
        """Unbind it again: that caller's TokenReviews are now the API server's 403."""
        self._reviewers.discard(username)

    def grant_token_request(self, username: str, namespace: str, name: str) -> None:
        """What a Role with ``create`` on ``serviceaccounts/token`` (resourceNames: ``name``)
        bound to ``username`` allows: TokenRequests for that service account."""
        self._token_requesters.add((username, namespace, name))

    def add_dspa(self, namespace: str, name: str, external_url: str | None) -> None:
        status = (
            {"components": {"apiServer": {"externalUrl": external_url}}} if external_url else {}
        )
        self._objects[(namespace, name)] = {
            "apiVersion": f"datasciencepipelinesapplications.opendatahub.io/{self.dspa_version}",
            "kind": "DataSciencePipelinesApplication",
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }

    def kubeconfig(self, path: Path, token: str) -> Path:
        cluster: dict[str, str] = {"server": self.url}
        if self.tls is not None:
            cluster["certificate-authority"] = str(self.tls.ca)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "ctx",
        }
        path.write_text(json.dumps(config))
        return path

    # ---- the API ----------------------------------------------------------------------------

    def _caller(self, header: str | None) -> str:
        """The username of the request's bearer token, as the API server authenticates it."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() == "bearer" and token:
            if token in self._static:
                return self._static[token]
            with contextlib.suppress(TokenInvalid, KeyError, TypeError):
                return self.issuer.verify(token, API_AUDIENCES).username
        raise _ApiError(401, "Unauthorized", "Unauthorized")

    def review(self, caller: str, body: Any) -> dict[str, Any]:
        """POST tokenreviews: authenticate ``spec.token`` for ``spec.audiences``."""
        if caller not in self._reviewers:
            raise _ApiError(
                403,
                "Forbidden",
                f'tokenreviews.authentication.k8s.io is forbidden: User "{caller}" cannot create '
                'resource "tokenreviews" in API group "authentication.k8s.io" at the cluster '
                "scope",
                group="authentication.k8s.io",
                kind="tokenreviews",
            )
        if not isinstance(body, dict):
            raise _ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        # Left out, apiVersion and kind default to the URL's, as the API server's decoder does.
        version = body.get("apiVersion") or "authentication.k8s.io/v1"
        if version != "authentication.k8s.io/v1":
            raise _ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({version}) does not match the expected API "
                "version (authentication.k8s.io/v1)",
            )
        if (body.get("kind") or "TokenReview") != "TokenReview":
            raise _ApiError(
                400,
                "BadRequest",
                f"the kind in the data ({body['kind']}) does not match the expected kind "
                "(TokenReview)",
            )
        spec = body.get("spec") or {}
        self.reviews.append(dict(spec))
        wanted = list(spec.get("audiences") or API_AUDIENCES)
        token = str(spec.get("token") or "")
        status: dict[str, Any] = {"user": {}}
        if token in self._static:
            # Audience-agnostic tokens are good for the API server's own audiences only.
            if set(wanted) & set(API_AUDIENCES):
                status = {
                    "authenticated": True,
                    "user": {"username": self._static[token], "groups": ["system:authenticated"]},
                    "audiences": [a for a in wanted if a in API_AUDIENCES],
                }
        else:
            try:
                account = self.issuer.verify(token, wanted)
            except TokenInvalid as exc:
                status["error"] = f"[invalid bearer token, {exc}]"
            except (KeyError, TypeError, ValueError):
                status["error"] = "[invalid bearer token, square/go-jose: malformed claims]"
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": account.username,
                        "uid": account.uid,
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{account.namespace}",
                            "system:authenticated",
                        ],
                        "extra": {
                            "authentication.kubernetes.io/credential-id": [
                                f"JTI={account.credential_id}"
                            ]
                        },
                    },
                    "audiences": [a for a in wanted if a in account.audiences],
                }
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def token_request(self, caller: str, namespace: str, name: str, body: Any) -> dict[str, Any]:
        """POST .../serviceaccounts/<name>/token: a token for that account, as the kubelet's
        projected volumes get them (``spec.audiences``, ``spec.expirationSeconds`` >= 600)."""
        if (caller, namespace, name) not in self._token_requesters:
            raise _ApiError(
                403,
                "Forbidden",
                f'serviceaccounts "{name}" is forbidden: User "{caller}" cannot create resource '
                f'"serviceaccounts/token" in API group "" in the namespace "{namespace}"',
                name=name,
                kind="serviceaccounts",
            )
        spec = (body or {}).get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise _ApiError(400, "BadRequest", "the body of the request was not a TokenRequest")
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600:
            raise _ApiError(
                422,
                "Invalid",
                f'TokenRequest.authentication.k8s.io "{name}" is invalid: '
                f"spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration "
                "less than 10 minutes",
            )
        audiences = list(spec.get("audiences") or API_AUDIENCES)
        self.token_requests.append({"namespace": namespace, "name": name, "spec": dict(spec)})
        token = self.issuer.issue(namespace, name, audiences, expires_in_s=seconds)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": None},
            "status": {
                "token": token,
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }

    def dspa(self, path: str) -> dict[str, Any]:
        match = _DSPA.match(path)
        key = (match["ns"], match["name"]) if match else None
        if match is None or match["version"] != self.dspa_version or key not in self._objects:
            name = match["name"] if match else path
            raise _ApiError(404, "NotFound", f'datasciencepipelinesapplications "{name}" not found')
        return self._objects[key]


def _handler_class(api: KubeApiStandin) -> type[TrackedHandler]:
    class Handler(TrackedHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            api.seen_auth.append(self.headers.get("Authorization"))
            try:
                caller = api._caller(self.headers.get("Authorization"))
                requested = _TOKEN_REQUEST.match(path)
                if method == "POST" and (path == TOKENREVIEWS or requested):
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        raise _ApiError(400, "BadRequest", "the body is not JSON") from None
                    if requested:
                        payload = api.token_request(
                            caller, requested["ns"], requested["name"], body
                        )
                    else:
                        payload = api.review(caller, body)
                    code = 201
                elif method == "GET":
                    code, payload = 200, api.dspa(path)
                else:
                    raise _ApiError(404, "NotFound", "the server could not find the resource")
            except _ApiError as exc:
                code, payload = exc.code, exc.status()
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler
