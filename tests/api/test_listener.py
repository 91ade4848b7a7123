"""
The API on a real listening socket on 127.0.0.1: oversized bodies are refused
with 413 before they are read (declared length, chunked, ``Expect``), the
agent keeps serving afterwards, and TLS works with a certificate made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.resource import Resource

from ctrlagent.api import LimitedSite, make_http_service
from ctrlagent.config import HttpConfig
from tests.api.conftest import SECRET, UUID, ApiRig, panel_headers

LIMIT = 64 * 1024


class RawClient(Protocol):
    """Sends bytes as told and collects everything until the server closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.received)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@pytest_twisted.async_yield_fixture
async def listening() -> AsyncIterator[tuple[ApiRig, int]]:
    """The API (fakes behind it) on an ephemeral loopback port, real reactor."""
    rig = ApiRig(max_body_bytes=LIMIT)
    rig.api._clock = reactor  # type: ignore[assignment]
    site = LimitedSite(
        rig.api.app.resource(),
        max_body_bytes=LIMIT,
        clock=reactor,
        refused_grace=0.5,
        authorize=rig.api.authorized,
    )
    port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    try:
        yield rig, port.getHost().port
    finally:
        await port.stopListening()


async def raw_exchange(port: int, *chunks: bytes, pause: float = 0.05) -> bytes:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    for chunk in chunks:
        if client.closed.called:
            break
        client.transport.write(chunk)  # type: ignore[union-attr]
        await _sleep(pause)
    result: bytes = await client.closed
    return result


def _head(port: int, extra: str) -> bytes:
    return (
        "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n"
        "Content-Type: application/json\r\nAuthorization: Bearer {}\r\n{}\r\n".format(
            port, SECRET, extra
        )
    ).encode()


async def still_serving(port: int) -> None:
    response = await treq.post(
        "http://127.0.0.1:{}/api/command".format(port),
        data=json.dumps({"action": "system.ping"}).encode(),
        headers=panel_headers(),
    )
    assert response.code == 200
    assert (await response.json())["data"]["message"] == "pong"


@pytest_twisted.ensureDeferred
async def test_declared_length_over_the_limit_is_refused_before_the_body(
    listening: tuple[ApiRig, int],
) -> None:
    _, port = listening
    # Only the headers are sent: a 413 can only come from the declared length.
    raw = await raw_exchange(port, _head(port, "Content-Length: 1000000000\r\n"))
    status, headers, body = _response(raw)
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(body)["success"] is False
    await still_serving(port)


@pytest_twisted.ensureDeferred
async def test_expect_continue_gets_413_not_100(listening: tuple[ApiRig, int]) -> None:
    _, port = listening
    raw = await raw_exchange(
        port, _head(port, "Content-Length: 50000000\r\nExpect: 100-continue\r\n")
    )
    assert b"100 Continue" not in raw
    assert _response(raw)[0] == 413


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused(listening: tuple[ApiRig, int]) -> None:
    rig, port = listening
    piece = b"x" * 16384
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    # A valid JSON command would follow; the limit trips before it completes.
    raw = await raw_exchange(
        port,
        _head(port, "Transfer-Encoding: chunked\r\n"),
        *([chunk] * 8),
        b"0\r\n\r\n",
    )
    assert _response(raw)[0] == 413
    await still_serving(port)


@pytest_twisted.ensureDeferred
async def test_chunked_body_within_the_limit_is_served(listening: tuple[ApiRig, int]) -> None:
    _, port = listening
    body = json.dumps({"action": "system.ping", "payload": {"pad": "y" * 1000}}).encode()
    chunk = b"%x\r\n" % len(body) + body + b"\r\n"
    raw = await raw_exchange(
        port,
        _head(port, "Transfer-Encoding: chunked\r\nConnection: close\r\n"),
        chunk,
        b"0\r\n\r\n",
    )
    status, _, payload = _response(raw)
    assert status == 200
    assert b'"pong"' in payload


@pytest_twisted.ensureDeferred
async def test_a_real_client_uploading_too_much_reads_the_413(
    listening: tuple[ApiRig, int],
) -> None:
    _, port = listening
    big = json.dumps({"action": "upload_file", "payload": {"content": "A" * (LIMIT * 4)}})
    response = await treq.post(
        "http://127.0.0.1:{}/api/command".format(port), data=big.encode(), headers=panel_headers()
    )
    assert response.code == 413
    body = await response.json()
    assert body["success"] is False and "limit" in body["error"]
    await still_serving(port)


@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_is_accepted(listening: tuple[ApiRig, int]) -> None:
    _, port = listening
    prefix = json.dumps({"action": "system.ping", "payload": {"pad": ""}})
    pad = "z" * (LIMIT - len(prefix))
    body = json.dumps({"action": "system.ping", "payload": {"pad": pad}}).encode()
    assert len(body) == LIMIT
    response = await treq.post(
        "http://127.0.0.1:{}/api/command".format(port), data=body, headers=panel_headers()
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_form_body_reaches_the_api_not_twisteds_form_parser(
    listening: tuple[ApiRig, int],
) -> None:
    # A form without a boundary: Twisted's form parser would drop the
    # connection with a bare 400; the API answers in the Panel's JSON shape.
    _, port = listening
    body = b"not a form"
    raw = await raw_exchange(
        port,
        (
            "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n"
            "Content-Type: multipart/form-data\r\nAuthorization: Bearer {}\r\n"
            "Content-Length: {}\r\n\r\n".format(port, SECRET, len(body))
        ).encode() + body,
    )
    status, headers, answer = _response(raw)
    assert status == 400
    assert json.loads(answer)["code"] == "PARSE_ERROR"
    assert headers["content-length"] == str(len(answer))
    await still_serving(port)


@pytest_twisted.ensureDeferred
async def test_default_limit_fits_a_16_mib_file_as_base64() -> None:
    assert HttpConfig().max_body_bytes > (16 * 1024 * 1024) * 4 // 3 + 4096


# -- TLS -----------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[str, str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return str(cert_path), str(key_path), cert_pem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_the_panel(tmp_path: Path) -> None:
    cert_path, key_path, cert_pem = _self_signed(tmp_path)
    rig = ApiRig()
    port = _free_port()
    config = replace(
        rig.config,
        http=replace(
            rig.config.http, port=port, bind="127.0.0.1", tls_cert=cert_path, tls_key=key_path
        ),
    )
    assert config.http.endpoint_description().startswith("ssl:")
    service = make_http_service(reactor, config, rig.api)
    service.startService()
    try:
        trust = Certificate.loadPEM(cert_pem)

        class Policy(BrowserLikePolicyForHTTPS):
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return optionsForClientTLS(hostname.decode(), trustRoot=trust)

        client = treq.client.HTTPClient(Agent(reactor, contextFactory=Policy()))
        response = await client.get("https://127.0.0.1:{}/health".format(port))
        assert response.code == 200
        assert (await response.json())["nodeId"] == "node-test"
        response = await client.post(
            "https://127.0.0.1:{}/api/command".format(port),
            data=json.dumps({"action": "system.ping"}).encode(),
            headers=panel_headers(),
        )
        assert (await response.json())["data"]["message"] == "pong"
        # plain HTTP on the TLS port does not get an answer
        with pytest.raises(Exception):  # noqa: B017 - any transport error will do
            await treq.get("http://127.0.0.1:{}/health".format(port), timeout=2)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_waits_for_a_running_command() -> None:
    rig = ApiRig()
    rig.api._clock = reactor  # type: ignore[assignment]
    port = _free_port()
    config = replace(rig.config, http=replace(rig.config.http, port=port, bind="127.0.0.1"))
    service = make_http_service(reactor, config, rig.api)
    service.startService()
    rig.servers.create_server(UUID, {"image": "img"})
    rig.servers.start(UUID)
    gate = rig.servers.hold("stop")
    request = treq.post(
        "http://127.0.0.1:{}/api/command".format(port),
        data=json.dumps({"action": "stop_server", "serverId": UUID}).encode(),
        headers=panel_headers(),
    )
    for _ in range(100):
        if rig.api.in_flight:
            break
        await _sleep(0.02)
    stopped = service.stopService()
    fired: list[object] = []
    stopped.addBoth(lambda result: fired.append(result) or result)
    await _sleep(0.1)
    assert fired == []  # the stop_server command is still running
    gate.callback(None)
    await stopped
    assert fired
    response = await request
    assert (await response.json())["data"]["status"] == "offline"


def _channel_on(clock: Clock, grace: float = 2.0, drain_max: float = 30.0) -> tuple[Any, Any]:
    site = LimitedSite(
        Resource(),
        max_body_bytes=1024,
        clock=clock,
        refused_grace=grace,
        refused_drain_max=drain_max,
    )
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_refused_upload_is_drained_until_the_client_is_quiet() -> None:
    clock = Clock()
    channel, transport = _channel_on(clock)
    channel.dataReceived(b"POST /api/command HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    for _ in range(5):  # the client keeps uploading: the connection stays open
        clock.advance(1.5)
        channel.dataReceived(b"x" * 500)
        assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    # nothing after the 413 was ever answered
    assert transport.value().count(b"HTTP/1.1") == 1


def test_a_refused_upload_is_drained_for_a_bounded_time() -> None:
    clock = Clock()
    channel, transport = _channel_on(clock, grace=2.0, drain_max=10.0)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"800\r\n" + b"y" * 2048 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"z" * 100)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    assert not clock.getDelayedCalls()
