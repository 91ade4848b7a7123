"""
``tcp://`` and TLS ``DOCKER_HOST`` values: the client reaches the real engine
through a loopback relay (plain TCP, or TLS with client certificates, the way
a remote ``dockerd --tlsverify`` is reached), including the hand-written stdin
attach, which must work over any endpoint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)

from ctrlagent.engine.docker import DockerClient

from .conftest import Containers, make_client, unique_name, until, wait_for_line

pytestmark = pytest.mark.docker


class _Pipe(protocol.Protocol):
    """One side of the relay: forwards what it receives to its peer."""

    def __init__(self, peer: _Pipe | None = None) -> None:
        self.peer = peer
        self.buffer: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.buffer.append(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Relay(_Pipe):
    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = socket_path

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.pauseProducing()
        engine = _Pipe(peer=self)
        d = connectProtocol(UNIXClientEndpoint(reactor, self.socket_path), engine)

        def connected(_: Any) -> None:
            self.peer = engine
            for data in self.buffer:
                engine.transport.write(data)  # type: ignore[union-attr]
            self.buffer.clear()
            self.transport.resumeProducing()  # type: ignore[union-attr]

        d.addCallbacks(connected, lambda _: self.transport.loseConnection())  # type: ignore[union-attr]


def _relay_factory(socket_path: str) -> protocol.Factory:
    return protocol.Factory.forProtocol(lambda: _Relay(socket_path))


async def _round_trip(client: DockerClient, containers: Containers) -> None:
    assert await client.ping() is True
    assert (await client.version())["ApiVersion"]
    cid = await client.container_create(
        unique_name("remote"),
        {"Image": containers.image, "OpenStdin": True, "Labels": {"ctrlagent.test": "remote"}},
    )
    containers.ids.append(cid)
    await client.container_start(cid)
    out = client.attach_output(cid, logs=True)  # may open after the reply: its past too
    pipe = await client.attach_stdin(cid)
    pipe.write_line("say over the wire")
    await wait_for_line(out, "[Server] over the wire")
    out.close()
    await pipe.close()
    history = [line async for _, line in client.logs(cid, follow=False)]
    assert "> say over the wire" in history


@pytest_twisted.ensureDeferred
async def test_a_tcp_docker_host(docker_engine: Any, containers: Containers) -> None:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        _relay_factory(docker_engine.socket_path)
    )
    client = make_client("tcp://127.0.0.1:{}".format(port.getHost().port))
    try:
        await _round_trip(client, containers)
    finally:
        await client.close()
        await port.stopListening()


def _make_cert(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest_twisted.ensureDeferred
async def test_a_tls_docker_host_with_client_certificates(
    docker_engine: Any, containers: Containers, tmp_path: Path
) -> None:
    from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate

    key, cert = _make_cert(tmp_path)
    # One self-signed certificate is the CA, the server's and the client's.
    private = PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())
    options = CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        verify=True,
        caCerts=[Certificate.loadPEM(cert.read_bytes()).original],
        requireCertificate=True,
    )
    port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
        _relay_factory(docker_engine.socket_path)
    )
    host = "tcp://localhost:{}".format(port.getHost().port)
    client = make_client(host, tls_ca=str(cert), tls_cert=str(cert), tls_key=str(key))
    try:
        assert client.host.kind == "tls"
        await _round_trip(client, containers)
    finally:
        await client.close()
        await port.stopListening()


class _Tracked(protocol.Factory):
    """The relay factory, remembering its connections so a test can cut them."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.live: list[_Relay] = []

    def buildProtocol(self, addr: Any) -> _Relay:  # noqa: N802
        relay = _Relay(self.socket_path)
        self.live.append(relay)
        return relay

    def cut(self) -> None:
        for relay in self.live:
            if relay.transport is not None:
                relay.transport.abortConnection()  # type: ignore[attr-defined]
        self.live.clear()


@pytest_twisted.ensureDeferred
async def test_resumable_events_replay_what_happened_during_a_break(
    docker_engine: Any, docker: DockerClient, containers: Containers
) -> None:
    import secrets

    from twisted.internet.defer import Deferred

    from ctrlagent.engine.docker import DockerEvent

    from .conftest import within

    factory = _Tracked(docker_engine.socket_path)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    number = port.getHost().port
    remote = make_client("tcp://127.0.0.1:{}".format(number))
    marker = secrets.token_hex(4)
    labels = {"ctrlagent.test": marker}
    breaks: list[Any] = []
    events = remote.resumable_events(
        labels, retry_delay=0.1, max_retry_delay=0.2, on_break=breaks.append
    )
    got: list[DockerEvent] = []

    async def consume() -> None:
        async for event in events:
            got.append(event)

    consuming = Deferred.fromCoroutine(consume())
    try:
        first = await containers.create({"CRASH_AFTER": "0.1", "CRASH_CODE": "4"}, Labels=labels)
        await until(lambda: any(e.exit_code == 4 for e in got), 10)
        # The link breaks; while it is down, another server crashes.
        await port.stopListening()
        factory.cut()
        await until(lambda: bool(breaks), 5)
        second = await containers.create({"CRASH_AFTER": "0.1", "CRASH_CODE": "7"}, Labels=labels)
        assert await within(10, docker.container_wait(second)) == 7
        assert not any(e.container_id == second for e in got)
        port = await TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(factory)
        await until(lambda: any(e.exit_code == 7 for e in got), 10)
        assert [(e.container_id, e.action) for e in got] == [
            (first, "start"), (first, "die"), (second, "start"), (second, "die")
        ]
    finally:
        events.close()
        await within(5, consuming)
        await remote.close()
        await port.stopListening()

