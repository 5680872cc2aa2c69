"""Certificates for TLS tests, made in the test session (never committed): a server CA with a
certificate for 127.0.0.1/localhost, a client CA with a client certificate ("gateway"), and a
client certificate from an unrelated CA ("stranger")."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def make_certificates(directory: Path) -> dict[str, Path]:
    """A server CA and a certificate for 127.0.0.1/localhost; a client CA and a client certificate;
    and a client certificate from an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def issue(subject: str, issuer=None, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name(subject), key)
        builder = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    import ipaddress

    def write(stem: str, cert, key) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    server_ca = issue("test server CA", ca=True)
    client_ca = issue("test client CA", ca=True)
    other_ca = issue("unrelated CA", ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server-ca", *server_ca)
    write("client-ca", *client_ca)
    write("server", *issue("infercore", server_ca, san=san))
    write("client", *issue("gateway", client_ca))
    write("stranger", *issue("stranger", other_ca))
    return {stem: directory / f"{stem}.pem" for stem in ("server-ca", "client-ca", "server", "client", "stranger")}
