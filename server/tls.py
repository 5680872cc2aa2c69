"""TLS on the HTTP port: HTTPS when ``--tls-cert``/``--tls-key`` are set, mutual TLS with
``--tls-client-ca``, and the verified client certificate's subject as the request's tenant.

uvicorn does not put the peer certificate into the ASGI scope, so the HTTP protocol class is
extended: each TLS connection reads its peer certificate once and every request on it carries the
subject in ``scope["state"]["tenant"]`` (metadata for logs, never a credential on its own: the TLS
handshake already verified the certificate against the client CA).
"""

from __future__ import annotations

import ssl
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from .config import ServerConfig


def uvicorn_tls_options(config: ServerConfig) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the HTTP port's TLS (none without a certificate)."""
    if config.tls_cert is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(config.tls_cert),
        "ssl_keyfile": str(config.tls_key),
        "http": client_identity_protocol(),
    }
    if config.tls_client_ca is not None:
        options["ssl_ca_certs"] = str(config.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def subject_of(certificate: dict | None) -> str | None:
    """'CN=gateway,O=acme' from ssl's getpeercert() dict; None without a certificate."""
    if not certificate:
        return None
    parts = [f"{_SHORT.get(key, key)}={value}" for rdn in certificate.get("subject", ()) for key, value in rdn]
    return ",".join(parts) or None


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "E"}


def client_identity_protocol() -> type:
    base = import_from_string(HTTP_PROTOCOLS["auto"])

    class ClientIdentityProtocol(base):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            tenant = subject_of(ssl_object.getpeercert()) if ssl_object is not None else None
            if tenant is None:
                return
            app = self.app

            async def with_tenant(scope, receive, send):
                if scope["type"] == "http":
                    scope.setdefault("state", {})["tenant"] = tenant
                await app(scope, receive, send)

            self.app = with_tenant

    return ClientIdentityProtocol
