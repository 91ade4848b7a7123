"""
The link's text frames on the wire: written by the protocol's own lean
frame writer (``PanelProtocol._write_text``) whenever Autobahn would write
one plain masked frame, and by Autobahn's ``sendMessage`` otherwise.  A real
Autobahn WebSocket server (the ``FakePanel``) receives them: it checks the
mask bit, the length encodings and UTF-8 as any Panel's server would.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.types import ConnectingRequest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from ctrlagent.panel.protocol import PanelClientFactory, PanelProtocol
from ctrlagent.testing.panel import FakePanel

SECRET = "frames-secret"
# Every length encoding: 7-bit, 16-bit and 64-bit, at and around each edge.
SIZES = [0, 1, 125, 126, 127, 4095, 4096, 4097, 65535, 65536, 300_000]


class Hooks:
    """The link's side of the protocol, reduced to what these tests watch."""

    def __init__(self) -> None:
        self.opened: Deferred[PanelProtocol] = Deferred()

    def connecting_request(self, factory: Any) -> ConnectingRequest:
        return ConnectingRequest(
            host=factory.host, port=factory.port, resource=factory.resource,
            headers={"Authorization": "Bearer " + SECRET}, useragent=factory.useragent,
        )

    def connection_opened(self, protocol: PanelProtocol) -> None:
        self.opened.callback(protocol)

    def frame_received(self, protocol: PanelProtocol, payload: bytes) -> None:
        pass

    def connection_closed(self, *args: Any) -> None:
        pass

    def writes_paused(self, protocol: PanelProtocol) -> None:
        pass

    def writes_resumed(self, protocol: PanelProtocol) -> None:
        pass


async def _connected(**options: Any) -> tuple[FakePanel, PanelProtocol, Any]:
    panel = FakePanel(reactor, SECRET, request_system_info=False, parse=False)
    got: list[bytes] = []
    panel.on_frame = got.append
    panel.got = got  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    hooks = Hooks()
    factory = PanelClientFactory(
        hooks, "ws://127.0.0.1:{}/ws?nodeId=n1".format(port.getHost().port), reactor)
    factory.setProtocolOptions(maxMessagePayloadSize=1_000_000)
    for name, value in options.items():
        setattr(factory, name, value)  # as setProtocolOptions or the attribute itself sets it
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await connectProtocol(endpoint, factory.buildProtocol(None))
    protocol = await hooks.opened
    return panel, protocol, port


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out")


def _utf8_payload(size: int) -> bytes:
    # Exactly ``size`` bytes of valid UTF-8 (ASCII filler after a multi-byte start).
    head = "é€".encode()
    return (head + b"a" * size)[:size] if size >= len(head) else b"a" * size


@pytest_twisted.ensureDeferred
async def test_every_length_encoding_arrives_intact_through_the_lean_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    panel, protocol, port = await _connected()
    try:
        assert protocol._plain(100)
        # The lean writer, not Autobahn's: sendMessage is never called.
        monkeypatch.setattr(protocol, "sendMessage", lambda *a, **k: pytest.fail("sendMessage"))
        sent = [_utf8_payload(n) for n in SIZES]
        for data in sent:
            assert protocol.send_frame(data)
        got = panel.got  # type: ignore[attr-defined]
        await _until(lambda: len(got) == len(sent))
        assert got == sent
        stats = protocol.trafficStats
        assert stats.outgoingWebSocketMessages == len(sent)
        assert stats.outgoingOctetsAppLevel == sum(SIZES)
        # Frames are masked with a fresh key each: the same payload twice
        # differs on the wire.
        writes: list[bytes] = []
        real_write = protocol.transport.write
        monkeypatch.setattr(protocol.transport, "write", lambda b: (writes.append(b),
                                                                     real_write(b)))
        protocol.send_frame(b"same")
        protocol.send_frame(b"same")
        assert len(writes) == 2 and writes[0][:2] == writes[1][:2] == b"\x81\x84"
        assert writes[0][2:] != writes[1][2:]
        await _until(lambda: len(got) == len(sent) + 2)
    finally:
        protocol.transport.loseConnection()
        await port.stopListening()


@pytest.mark.parametrize("option", [{"logFrames": True}, {"autoFragmentSize": 1000},
                                    {"logOctets": True}])
@pytest_twisted.ensureDeferred
async def test_anything_but_a_plain_frame_is_left_to_autobahn(option: dict[str, Any]) -> None:
    panel, protocol, port = await _connected(**option)
    try:
        assert not protocol._plain(10)
        calls: list[int] = []
        real = protocol.sendMessage

        def counted(data: bytes, isBinary: bool = False, **kw: Any) -> None:  # noqa: N803
            calls.append(len(data))
            real(data, isBinary, **kw)

        protocol.sendMessage = counted  # type: ignore[method-assign]
        sent = [_utf8_payload(n) for n in (0, 5000, 70000)]
        for data in sent:
            assert protocol.send_frame(data)
        got = panel.got  # type: ignore[attr-defined]
        await _until(lambda: len(got) == len(sent))
        assert got == sent and calls == [0, 5000, 70000]
    finally:
        protocol.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_frame_over_the_size_limit_is_refused_as_autobahn_refuses_it() -> None:
    from autobahn.exception import PayloadExceededError

    panel, protocol, port = await _connected()
    try:
        assert not protocol._plain(1_000_001)
        with pytest.raises(PayloadExceededError):
            protocol.send_frame(b"a" * 1_000_001)
    finally:
        protocol.transport.loseConnection()
        await port.stopListening()
