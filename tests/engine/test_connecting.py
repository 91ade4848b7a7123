"""``ctrlagent.engine.connecting.connect_protocol``: Twisted's ``connectProtocol``, quiet."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from ctrlagent.engine.connecting import connect_protocol

reactor: Any = _reactor


class _Client(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        self.lost.callback(None)


async def _factory_lines(connect: Any) -> tuple[list[str], Any, Any]:
    """The factory log lines around one connection made by ``connect``, and its protocol."""
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if "factory" in text.lower():
            lines.append(text)

    server = Factory.forProtocol(Protocol)
    server.noisy = False
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    globalLogPublisher.addObserver(observe)
    try:
        client = _Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        connected = await connect(endpoint, client)
        client.transport.loseConnection()
        await client.lost
        await deferLater(reactor, 0.01, lambda: None)  # the factory stops after the loss
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()
    return lines, connected, client


@pytest_twisted.ensureDeferred
async def test_a_connection_for_one_protocol_logs_no_factory_lines() -> None:
    lines, connected, client = await _factory_lines(connect_protocol)
    assert connected is client
    assert lines == []
    # Twisted's own logs a start and a stop per connection (500 servers: 2,000 lines).
    lines, connected, client = await _factory_lines(connectProtocol)
    assert connected is client
    assert len(lines) == 2 and "Starting factory" in lines[0] and "Stopping factory" in lines[1]
