"""
Test doubles for the Panel link (txacme style: a public ``testing`` module).

``FakePanel`` is a real Autobahn ``WebSocketServerFactory`` that behaves like the
Panel's WebSocket endpoint as PROTOCOL.md section 3 records it: it refuses a
wrong secret with HTTP 401, closes with 1008 "Invalid node ID" when the query
has no ``nodeId``, sends ``system_info_request`` first, and records every frame
it receives with its arrival time.  Listen on it with ``listenTCP`` (integration
tests, the benchmark) or connect it in memory with ``MemoryPanelEndpoint`` and
``twisted.test.iosim`` (unit tests on a ``Clock``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.test import iosim
from zope.interface import implementer


def _number(text: str) -> int | Decimal:
    try:
        return int(text)
    except ValueError:  # more digits than int() takes: the agent echoes such ids
        return Decimal(text)


_DECODER = json.JSONDecoder(parse_int=_number)


@dataclass
class Received:
    """One frame the fake Panel received."""

    at: float
    frame: Any
    connection: int  # index into FakePanel.connections
    raw: bytes = b""  # the message as it came, for byte-exact checks
    read: int = 0  # which read of its connection's socket brought it (1, 2, ...)


class FakePanelProtocol(WebSocketServerProtocol):
    """Server side of one agent connection; forwards to the ``FakePanel``."""

    factory: FakePanelFactory
    index = -1
    reads = 0  # the socket reads so far (messages name the read that brought them)

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        super().dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.panel.handshake(self, request)

    def onOpen(self) -> None:
        self.factory.panel.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.panel.message(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.panel.closed(self)


class FakePanelFactory(WebSocketServerFactory):
    """The Autobahn server factory of a ``FakePanel``."""

    protocol = FakePanelProtocol  # type: ignore[assignment]

    def __init__(self, panel: FakePanel, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.panel = panel


class FakePanel:
    """The Panel's WebSocket endpoint, recording what the agent sends."""

    def __init__(
        self,
        clock: Any,
        secret: str,
        *,
        request_system_info: bool = True,
        parse: bool = True,
        node_ids: set[str] | None = None,
    ) -> None:
        self.clock = clock
        # When set, only these node ids are accepted (others get 1008, as an
        # unknown node does on a real Panel).
        self.node_ids = node_ids
        self.secret = secret
        self.request_system_info = request_system_info
        # The benchmark counts lines without keeping every frame.
        self.parse = parse
        self.factory = FakePanelFactory(self, clock)
        self.factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=0)
        self.requests: list[ConnectionRequest] = []
        self.refusals: list[int] = []
        self.connections: list[FakePanelProtocol] = []
        self.current: FakePanelProtocol | None = None
        self.received: list[Received] = []
        self.open_times: list[float] = []
        self.close_times: list[float] = []
        self.on_frame: Callable[[Any], None] | None = None
        self._waiters: list[tuple[Callable[[list[Received]], Any], Deferred[Any]]] = []

    # --- server callbacks -------------------------------------------------------------------

    def handshake(self, protocol: FakePanelProtocol, request: ConnectionRequest) -> None:
        self.requests.append(request)
        if request.headers.get("authorization") != "Bearer " + self.secret:
            self.refusals.append(401)
            raise ConnectionDeny(401, "Unauthorized")

    def opened(self, protocol: FakePanelProtocol) -> None:
        protocol.index = len(self.connections)
        self.connections.append(protocol)
        self.open_times.append(self.clock.seconds())
        node_ids = protocol.http_request_params.get("nodeId") or [""]
        if not node_ids[0] or (self.node_ids is not None and node_ids[0] not in self.node_ids):
            # What older Panels do: the node id comes only from the query.
            # sendClose() only allows application codes; 1008 is a protocol one.
            protocol.sendCloseFrame(1008, b"Invalid node ID")
            return
        self.current = protocol
        if self.request_system_info:
            self.send({"type": "system_info_request"})
        self._check()

    def message(self, protocol: FakePanelProtocol, payload: bytes) -> None:
        if not self.parse:
            if self.on_frame is not None:
                self.on_frame(payload)
            return
        frame = _DECODER.decode(payload.decode("utf-8"))
        self.received.append(
            Received(self.clock.seconds(), frame, protocol.index, payload, protocol.reads)
        )
        if self.on_frame is not None:
            self.on_frame(frame)
        self._check()

    def closed(self, protocol: FakePanelProtocol) -> None:
        if protocol is self.current:
            self.current = None
            self.close_times.append(self.clock.seconds())
        self._check()

    # --- test controls ----------------------------------------------------------------------

    def send(self, frame: Any, *, binary: bool = False) -> None:
        """
        Send ``frame`` (JSON-encoded unless bytes/str) to the agent on the open
        connection.  Bytes go out as they are, even when not UTF-8 (a text
        frame the agent must survive); ``binary`` sends a binary frame.
        """
        assert self.current is not None, "no agent connected"
        if isinstance(frame, bytes):
            payload = frame
        elif isinstance(frame, str):
            payload = frame.encode("utf-8", "surrogatepass")
        else:
            payload = json.dumps(frame).encode("utf-8")
        self.current.sendMessage(payload, isBinary=binary)

    def drop(self) -> None:
        """Kill the TCP connection mid-stream, without a WebSocket close."""
        assert self.current is not None, "no agent connected"
        transport: Any = self.current.transport
        transport.abortConnection()

    def frames(self, kind: str | None = None, connection: int | None = None) -> list[Any]:
        """Received frames, optionally of one ``type``/``event`` and one connection."""
        out = []
        for r in self.received:
            if connection is not None and r.connection != connection:
                continue
            if kind is not None and kind not in (r.frame.get("type"), r.frame.get("event")):
                continue
            out.append(r.frame)
        return out

    def responses(self) -> dict[str, list[Any]]:
        """Response frames by command id."""
        out: dict[str, list[Any]] = {}
        for frame in self.frames("response"):
            out.setdefault(str(frame.get("id")), []).append(frame)
        return out

    def console_lines(self, server_id: str | None = None) -> list[str]:
        """Console lines received in ``server_log`` events, in order."""
        lines: list[str] = []
        for frame in self.frames("server_log"):
            if server_id is None or frame["data"]["serverId"] == server_id:
                lines.extend(frame["data"]["lines"])
        return lines

    def wait_for(self, predicate: Callable[[list[Received]], Any]) -> Deferred[Any]:
        """Fire with ``predicate(received)`` once it is truthy."""
        value = predicate(self.received)
        if value:
            return succeed(value)
        d: Deferred[Any] = Deferred()
        self._waiters.append((predicate, d))
        return d

    def wait_for_frame(self, kind: str, count: int = 1) -> Deferred[Any]:
        """Fire with the ``count``-th frame of ``kind`` received."""

        def found(received: list[Received]) -> Any:
            matching = [
                r.frame for r in received if kind in (r.frame.get("type"), r.frame.get("event"))
            ]
            return matching[count - 1] if len(matching) >= count else None

        return self.wait_for(found)

    def _check(self) -> None:
        for entry in list(self._waiters):
            predicate, d = entry
            value = predicate(self.received)
            if value and entry in self._waiters:
                self._waiters.remove(entry)
                d.callback(value)


@implementer(IStreamClientEndpoint)
class MemoryPanelEndpoint:
    """
    A client endpoint that connects to a ``FakePanel`` in memory through ``iosim``.

    Each connection's ``IOPump`` is kept in ``pumps``; ``flush()`` moves bytes
    both ways.  Set ``refuse`` to make connection attempts fail at the TCP level.
    """

    def __init__(self, panel: FakePanel) -> None:
        self.panel = panel
        self.pumps: list[iosim.IOPump] = []
        self.attempts = 0
        self.refuse = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("memory panel refuses"))
        address = IPv4Address("TCP", "127.0.0.1", 8080)
        server = self.panel.factory.buildProtocol(address)
        client = protocolFactory.buildProtocol(address)
        assert server is not None and client is not None
        server_transport = iosim.FakeTransport(server, isServer=True)
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(
            server, server_transport, client, client_transport, greet=False, clock=None
        )
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        """Deliver everything written on every connection, until quiet."""
        for pump in self.pumps:
            pump.flush()
