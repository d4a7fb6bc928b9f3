"""Service-account tokens as the API server's issuer makes them: ES256-signed JWTs.

The claims are the ones a projected token carries (``iss``, ``sub``, ``aud``, ``exp``, ``iat``,
``nbf``, ``jti`` and the ``kubernetes.io`` block), so a token from here is a real bearer token
that only this issuer's key verifies. :meth:`TokenIssuer.verify` refuses what the API server's
authenticator refuses, with the messages it gives.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

SA_PREFIX = "system:serviceaccount:"
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class TokenInvalid(ValueError):
    """The token does not authenticate; the message is the authenticator's reason."""


@dataclass(frozen=True)
class ServiceAccount:
    """Who a verified token speaks for."""

    namespace: str
    name: str
    uid: str
    audiences: tuple[str, ...]  # the token's own audiences
    credential_id: str  # the token's jti

    @property
    def username(self) -> str:
        return f"{SA_PREFIX}{self.namespace}:{self.name}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """One signing key and issuer name; tokens it signs verify here and nowhere else."""

    def __init__(self, issuer: str = DEFAULT_ISSUER) -> None:
        self.issuer = issuer
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._uids: dict[tuple[str, str], str] = {}

    def issue(
        self,
        namespace: str,
        name: str,
        audiences: list[str] | tuple[str, ...],
        *,
        expires_in_s: float = 3600,
        not_before_in_s: float = 0,
    ) -> str:
        """A token for ``system:serviceaccount:<namespace>:<name>`` valid for ``audiences``.

        A negative ``expires_in_s`` makes one that has already expired.
        """
        now = int(time.time())
        uid = self._uids.setdefault((namespace, name), str(uuid.uuid4()))
        claims = {
            "aud": list(audiences),
            "exp": now + int(expires_in_s),
            "iat": now + int(min(0, expires_in_s)) - 1,
            "nbf": now + int(not_before_in_s),
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "sub": f"{SA_PREFIX}{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": uid},
            },
        }
        header = _b64(json.dumps({"alg": "ES256", "kid": "standin", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return f"{header}.{payload}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str, audiences: list[str] | tuple[str, ...]) -> ServiceAccount:
        """The service account ``token`` speaks for, if it is valid now for one of ``audiences``.

        :raises TokenInvalid: malformed, not signed by this issuer, expired, not yet valid, or
            for other audiences.
        """
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenInvalid("square/go-jose: compact JWS format must have three parts")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise TokenInvalid("square/go-jose: illegal base64 data in JWS") from None
        if not isinstance(header, dict) or header.get("alg") != "ES256" or len(signature) != 64:
            raise TokenInvalid("square/go-jose: error in cryptographic primitive")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._key.public_key().verify(
                der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise TokenInvalid("square/go-jose: error in cryptographic primitive") from None
        if not isinstance(claims, dict) or claims.get("iss") != self.issuer:
            raise TokenInvalid("token issuer is not trusted")
        now = time.time()
        if now >= claims["exp"]:
            raise TokenInvalid("service account token has expired")
        if now < claims["nbf"]:
            raise TokenInvalid("service account token is not valid yet")
        token_audiences = [str(a) for a in claims["aud"]]
        if not set(token_audiences) & set(audiences):
            raise TokenInvalid(
                f"token audiences {json.dumps(token_audiences)} is invalid for the target "
                f"audiences {json.dumps(list(audiences))}"
            )
        kube = claims["kubernetes.io"]
        return ServiceAccount(
            namespace=kube["namespace"],
            name=kube["serviceaccount"]["name"],
            uid=kube["serviceaccount"]["uid"],
            audiences=tuple(token_audiences),
            credential_id=claims["jti"],
        )
