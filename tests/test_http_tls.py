"""HTTPS and mutual TLS on the HTTP port (the EIS deployment: Elasticsearch presents a client
certificate): a real `infercore serve` process with certificates made for the test; clients that
trust the CA are served, plaintext and unknown client certificates are refused, and the client
certificate's subject is logged as the tenant (metadata only)."""

from __future__ import annotations

import ssl

import httpx
import pytest

from tests.certificates import make_certificates
from tests.server_process import start_server

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, tiny_bert_dir, certificates):
    args = [
        "--model", f"tiny={tiny_bert_dir}",
        "--tls-cert", str(certificates["server"]), "--tls-key", str(certificates["server"].with_suffix(".key")),
        "--tls-client-ca", str(certificates["client-ca"]),
        "--api-key", "secret", "--log-level", "debug",
    ]
    server = start_server(args, tmp_path_factory.mktemp("mtls"), "mtls", scheme="https",
                          verify=_context(certificates, "client"))
    yield server
    server.stop()


def _context(certificates, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates["server-ca"]))
    if client is not None:
        context.load_cert_chain(str(certificates[client]), str(certificates[client].with_suffix(".key")))
    return context


def test_a_client_with_a_certificate_from_the_client_ca_and_the_key_is_served(mtls_server, certificates):
    headers = {"Authorization": "Bearer secret", "traceparent": TRACEPARENT}
    with httpx.Client(verify=_context(certificates, "client"), trust_env=False) as client:
        body = {"input": ["hello"], "model": "tiny"}
        response = client.post(f"{mtls_server.url}/api/v1/embed/text/dense", json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]) == 32
        assert client.post(f"{mtls_server.url}/embed", json={"inputs": "x"}).status_code == 401  # key still needed
    logs = mtls_server.log()
    # the access line (INFO)
    assert 'status=200 model=tiny tokens=3' in logs and 'tenant="CN=gateway"' in logs
    assert f"trace_id={TRACEPARENT.split('-')[1]}" in logs
    assert "hello" not in logs  # metadata only


@pytest.mark.parametrize("client_cert", [None, "stranger"])
def test_no_certificate_or_one_from_another_ca_is_refused_in_the_handshake(mtls_server, certificates, client_cert):
    with httpx.Client(verify=_context(certificates, client_cert), trust_env=False) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            client.get(f"{mtls_server.url}/health")


def test_plaintext_http_is_not_served_on_a_tls_port(mtls_server):
    plain = mtls_server.url.replace("https://", "http://")
    with httpx.Client(trust_env=False) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
            client.get(f"{plain}/health")
