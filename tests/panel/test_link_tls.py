"""
The link over ``wss://``: a loopback Panel with a certificate for ``localhost``
signed by a private CA, trusted through ``panel.tls_ca``; without that trust the
agent refuses the Panel's certificate and never opens the link.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import succeed

from ctrlagent.config import AgentConfig
from ctrlagent.errors import ConfigInvalid
from ctrlagent.panel.link import PanelLink
from ctrlagent.testing.panel import FakePanel
from ctrlagent.testing.servers import FakeServerManager

from .harness import SECRET
from .test_link_loopback import fast_config, sleep, until

reactor: Any = _reactor


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path) -> tuple[Path, bytes, bytes]:
    """A CA (written to ``ca.pem``) and a ``localhost`` certificate + key it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ctrlagent test CA"))
        .issuer_name(_name("ctrlagent test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ca_path, cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_panel(tmp_path: Path) -> Iterator[tuple[FakePanel, int, Path]]:
    ca_path, cert_pem, key_pem = make_pki(tmp_path)
    panel = FakePanel(reactor, SECRET)
    options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    port = reactor.listenSSL(0, panel.factory, options, interface="127.0.0.1")
    yield panel, port.getHost().port, ca_path
    pytest_twisted.blockon(port.stopListening())


def make_link(port: int, **panel: Any) -> PanelLink:
    config = fast_config(port, **panel)
    # Only 127.0.0.1 listens; the certificate names localhost.
    url = "wss://localhost:{}/ws".format(port)
    config = AgentConfig(node_id="node-1", secret=SECRET, development=True,
                         panel=type(config.panel)(**{**config.panel.__dict__, "url": url}))
    servers = FakeServerManager(reactor)
    return PanelLink(reactor, config, None, servers,  # type: ignore[arg-type]
                     lambda: succeed({"os": "linux"}), lambda: succeed({}))


@pytest_twisted.ensureDeferred
async def test_wss_with_a_private_ca_connects_and_verifies_the_hostname(
    tls_panel: tuple[FakePanel, int, Path],
) -> None:
    panel, port, ca_path = tls_panel
    link = make_link(port, tls_ca=str(ca_path))
    link.startService()
    try:
        await until(lambda: link.connected, 10)
        await panel.wait_for_frame("system_info", 2).addTimeout(5, reactor)
        assert panel.requests[0].headers["authorization"] == "Bearer " + SECRET
    finally:
        await link.stopService()


@pytest_twisted.ensureDeferred
async def test_wss_refuses_a_certificate_it_cannot_verify(
    tls_panel: tuple[FakePanel, int, Path], fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    panel, port, _ = tls_panel
    link = make_link(port)  # system trust store: our private CA is unknown
    link.startService()
    try:
        await sleep(0.5)
        assert not link.connected and link.connections == 0
        assert panel.requests == []  # no upgrade request (and no secret) was ever sent
    finally:
        await link.stopService()
    # Autobahn logs TLS failures at error level on both ends, rightly: an
    # unverifiable Panel certificate is a real fault, not a retry condition.
    client_errors = [
        e for e in fail_on_logged_errors if "WebSocketClientProtocol" in e.get("log_namespace", "")
    ]
    assert client_errors and all(
        "certificate verify failed" in e["log_format"] for e in client_errors
    )
    fail_on_logged_errors.clear()


def test_an_unreadable_or_empty_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="tls_ca"):
        make_link(443, tls_ca=str(tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(ConfigInvalid, match="tls_ca"):
        make_link(443, tls_ca=str(tmp_path / "empty.pem"))
