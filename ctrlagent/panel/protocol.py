"""
The Autobahn side of the link: ``PanelProtocol`` (thin, magic-wormhole style:
every callback is forwarded to the link through ``LinkHooks``), its factory,
and the write flow of one connection (``_Drain``).

``_Drain`` is a pull producer on the connection's lowest transport that learns
when the bytes written have been taken by the kernel, send by send.  It is the
write flow control (past a buffer's worth, events wait in the link's outbox) and it
settles the receipts of the console frames written before: the link is the
server manager's acknowledging consumer (``IConsoleConsumer``), whose marks
advance only on those receipts, or on the outbox dropping a frame
(``ctrlagent.servers.delivery``).  Console frames the kernel never took when a
connection fails go out first on the next one.
"""

from __future__ import annotations

import gc
import os
import struct
from collections import deque
from typing import Any, Protocol

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from ctrlagent import __version__
from ctrlagent.panel.outbox import CommandIntake, Entry, Receipts, settle


class LinkHooks(Protocol):
    """What the protocol and its drain call on the link (``PanelLink``)."""

    def connecting_request(self, factory: WebSocketClientFactory) -> ConnectingRequest: ...

    def connection_opened(self, protocol: PanelProtocol) -> None: ...

    def frame_received(self, protocol: PanelProtocol, payload: bytes) -> None: ...

    def connection_closed(
        self, protocol: PanelProtocol, code: int | None, reason: str | None, status: int | None
    ) -> None: ...

    def writes_paused(self, protocol: PanelProtocol) -> None: ...

    def writes_resumed(self, protocol: PanelProtocol) -> None: ...


@implementer(IPullProducer)
class _Drain:
    """
    Learns when the bytes written to one connection have left the agent.

    Registered as a pull (non-streaming) producer on the connection's lowest
    transport, the TCP socket's (below TLS): Twisted calls ``resumeProducing``
    each time that transport's write buffer has been emptied into the kernel.
    The console frames written before then have been taken by the kernel,
    unless bytes still wait above that buffer (Autobahn's send queue, TLS's
    buffers; see ``_held_above``): their receipts are settled then, in the
    same call (``ctrlagent.servers.delivery``).  Frames not taken when the
    connection fails are put back at the head of the outbox by the link.

    **Send by send, on a plain connection.**  When the WebSocket runs straight
    on a Twisted TCP transport (``ws://``), a frame written into the socket's
    buffer ends at a known byte offset: the bytes the kernel has taken so far
    plus what Twisted's buffer holds (``_buffered``).  The drain counts what
    each ``send`` takes (it wraps the transport's ``writeSomeData``, which
    Twisted's ``doWrite`` calls) and settles every frame whose last byte it
    took, in the same call as that system call.  So a Panel that reads slowly
    and never lets the buffer empty does not hold back frames the kernel
    already has (a SIGKILL would repeat them all), and from the send to the
    settlement the collector is held off, so no collection pause widens the
    gap between the kernel taking a frame and the journal record of its
    lines.  Under TLS the bytes in the socket's buffer are ciphertext (and
    some may still wait inside OpenSSL), so frames there settle at full
    drains, as do frames Autobahn queued.

    It is also the write flow control: past ``high_water`` bytes written and
    not yet drained, the link queues events in its outbox (``writes_paused``)
    until the next drain (``writes_resumed``).  A pull producer keeps a
    transport from closing, so it lets go once the transport is closing.
    """

    log = Logger()

    def __init__(self, link: LinkHooks, protocol: PanelProtocol) -> None:
        self._link = link
        self._protocol = protocol
        self.socket: Any = _socket_transport(protocol.transport)
        self.high_water = int(getattr(self.socket, "bufferSize", 0) or 65536)
        self.unsent = 0  # bytes written since the last drain
        # Console frames written, not yet taken, with the byte offset of
        # their last byte (None: not known, settled at a full drain).
        self.groups: deque[tuple[Entry, Receipts, int | None]] = deque()
        self.paused = False
        self.registered = False
        self.watching = False  # each send is watched (a plain TCP transport)
        self.taken = 0  # bytes the kernel took since the watch began

    def start(self) -> None:
        """Register with the socket's transport (it calls ``resumeProducing`` at once)."""
        try:
            self.socket.registerProducer(self, False)
        except Exception as e:
            # Never expected (the link registers nothing else there); without
            # drain reports a frame counts as delivered once written.
            self.log.warn(  # noqa: G010
                "cannot watch the Panel connection's write buffer ({error}): console lines"
                " count as delivered when written, so a SIGKILL may lose a few",
                error=str(e),
            )
            return
        self.registered = True
        self._watch_sends()

    def _watch_sends(self) -> None:
        """Count what each send takes (see the class docstring)."""
        socket = self.socket
        if (
            socket is not self._protocol.transport
            or not isinstance(socket, FileDescriptor)
            or _buffered(socket) is None
            or getattr(socket, "TLS", False)  # startTLS: its buffer holds ciphertext
        ):
            return  # TLS, or in memory (tests' iosim): settled at full drains
        send = socket.writeSomeData

        def counted_send(data: Any) -> Any:
            holding = bool(self.groups) and gc.isenabled()
            if holding:
                gc.disable()
            try:
                taken = send(data)
                if type(taken) is int and taken > 0:
                    self.taken += taken
                    self._settle_taken()
                return taken
            finally:
                if holding:
                    gc.enable()

        # On the instance: ``doWrite`` calls it as ``self.writeSomeData``.
        setattr(socket, "writeSomeData", counted_send)  # noqa: B010
        self.watching = True

    def _settle_taken(self) -> None:
        """Settle, in order, the frames whose last byte the kernel has taken."""
        groups = self.groups
        taken = self.taken
        while groups:
            end = groups[0][2]
            if end is None or end > taken:
                return
            self._settle(groups.popleft()[1])

    def _settle(self, receipts: Receipts) -> None:
        """Settle receipts; one that fails is logged (it runs inside a send)."""
        try:
            settle(receipts)
        except Exception:
            self.log.failure("settling console receipts failed")

    def wrote(self, size: int) -> None:
        """``size`` bytes were written to the connection."""
        self.unsent += size
        if not self.paused and self.registered and self.unsent >= self.high_water:
            self.paused = True
            self._link.writes_paused(self._protocol)

    def expect(self, entry: Entry, receipts: Receipts) -> None:
        """``entry`` was written: settle its receipts once the kernel has it."""
        if not self.registered:
            settle(receipts)
            return
        end = None
        if self.watching and not self._protocol.send_queue:
            buffered = _buffered(self.socket)
            if buffered is not None:
                end = self.taken + buffered
        self.groups.append((entry, receipts, end))

    def take_unsent(self) -> list[tuple[Entry, Receipts]]:
        """The frames written and not yet taken by the kernel (the connection failed)."""
        groups, self.groups = self.groups, deque()
        return [(entry, receipts) for entry, receipts, _ in groups]

    def resumeProducing(self) -> None:
        """The socket's write buffer is empty: what was written is the kernel's."""
        if not _held_above(self._protocol, self.socket):
            groups, self.groups = self.groups, deque()
            self.unsent = 0
            for _, receipts, _ in groups:
                self._settle(receipts)
            if self.paused:
                self.paused = False
                self._link.writes_resumed(self._protocol)
        else:
            self._settle_taken()  # frames at known offsets are the kernel's
        if self.registered and getattr(self.socket, "disconnecting", False):
            self.registered = False
            self.socket.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone; ``connection_closed`` puts back what was not taken."""
        self.registered = False


def _buffered(socket: Any) -> int | None:
    """
    The bytes waiting in a Twisted transport's write buffer (its private
    attributes, pinned by ``tests/panel/test_drain_sends.py``), or None when
    it does not have them.
    """
    try:
        return int(len(socket.dataBuffer) - socket.offset + socket._tempDataLen)
    except (AttributeError, TypeError):
        return None


def _socket_transport(transport: Any) -> Any:
    """The lowest transport under ``transport`` (below TLS and other protocol wrappers)."""
    for _ in range(16):
        if not isinstance(transport, ProtocolWrapper):
            break
        transport = transport.transport
    return transport


def _held_above(protocol: Any, socket: Any) -> bool:
    """
    True while bytes written to ``protocol`` wait above ``socket``'s buffer,
    where a drain of that buffer says nothing about them.  Those places are
    Autobahn's send queue (used only for chopped or synchronous writes, which
    the link never asks for), TLS's plaintext buffer (data written before the
    handshake or while OpenSSL must read first) and the small-write gathering
    of Twisted's buffering TLS transport (flushed on the next reactor turn).
    The last two are private attributes: ``tests/panel`` pins their names.
    """
    if getattr(protocol, "send_queue", None):
        return True
    layer = getattr(protocol, "transport", None)
    for _ in range(16):
        if layer is None or layer is socket:
            return False
        if getattr(layer, "_appSendBuffer", None):
            return True
        aggregator = getattr(layer, "_aggregator", None)
        if aggregator is not None and getattr(aggregator, "_buffer", None):
            return True
        layer = getattr(layer, "transport", None)
    return False


# Frames up to this size are masked in one integer XOR (Autobahn's masker above).
_SMALL_FRAME = 4096


class PanelProtocol(WebSocketClientProtocol):
    """Thin Autobahn protocol: every callback is forwarded to the ``PanelLink``."""

    factory: PanelClientFactory
    intake: CommandIntake | None = None
    drain: _Drain | None = None

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        # Built per attempt so that the credential headers are always current.
        return self.factory.link.connecting_request(self.factory)

    def onOpen(self) -> None:
        self.drain = _Drain(self.factory.link, self)
        self.drain.start()
        self.factory.link.connection_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.link.frame_received(self, payload)

    def unregisterProducer(self) -> None:
        """
        Autobahn calls this as it drops the connection, which would take the
        link's drain off the socket before its last drain: frames already
        taken by the kernel would never be settled, and would be sent again.
        The drain lets go by itself once the transport is closing.
        """

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.link.connection_closed(self, code, reason, self.handshake_status())

    def handshake_status(self) -> int | None:
        """The HTTP status the Panel answered our upgrade request with, if any."""
        line = getattr(self, "http_status_line", None)
        if not isinstance(line, str):
            return None
        words = line.split()
        if len(words) < 2 or not words[1].isdigit():
            return None
        return int(words[1])

    def is_writable(self) -> bool:
        """
        True while frames can be sent.

        Between the start of a close handshake (ours or the Panel's, or an
        auto-ping timeout) and ``onClose`` the protocol is no longer open and
        Autobahn refuses to send.
        """
        return bool(self.state == self.STATE_OPEN)

    def send_frame(self, data: bytes) -> bool:
        """Send one text frame; False (nothing sent) once the connection is closing."""
        if not self.is_writable():
            return False
        if self._plain(len(data)):
            self._write_text(data)
        else:
            self.sendMessage(data, isBinary=False)
        if self.drain is not None:
            self.drain.wrote(len(data))
        return True

    def _plain(self, size: int) -> bool:
        """
        Whether a text frame of ``size`` bytes is one masked frame written
        straight to the transport, as ``sendMessage`` would write it (no
        compression, fragmentation, send queue, frame/octet logging or
        timing; within the size limit).
        """
        # Autobahn copies these from the factory's options when the
        # connection is made; one missing means: not plain.
        option = self.__dict__.get
        limit = option("maxMessagePayloadSize", 0)
        return (
            option("_perMessageCompress", True) is None
            and option("autoFragmentSize", 1) == 0
            and not self.send_queue
            and option("logFrames", True) is False
            and option("logOctets", True) is False
            and option("trackTimings", True) is False
            and option("maskClientFrames", False) is True
            and not (0 < limit < size)
        )

    def _write_text(self, data: bytes) -> None:
        """
        One final, masked text frame (RFC 6455 section 5.2), what Autobahn's
        ``sendMessage`` writes without its per-frame cost: at a few hundred
        ``resource_update`` frames a second, its frame builder and the debug
        log arguments it formats eagerly were a quarter of the agent's CPU.
        The mask is fresh from the OS for every frame.
        """
        size = len(data)
        if size <= 125:
            head = bytes((0x81, 0x80 | size))
        elif size <= 0xFFFF:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        mask = os.urandom(4)
        if size <= _SMALL_FRAME:
            # One big-integer XOR: a few microseconds for a frame of this size,
            # less than setting up Autobahn's masker.
            key = (mask * (size // 4 + 1))[:size]
            masked = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
                size, "little")
        else:
            masked = create_xor_masker(mask, size).process(data)
        wire = b"".join((head, mask, masked))
        self.transport.write(wire)  # type: ignore[union-attr]
        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingWebSocketFrames += 1
        stats.outgoingOctetsAppLevel += size
        stats.outgoingOctetsWebSocketLevel += size
        stats.outgoingOctetsWireLevel += len(wire)


class _ExactTimer:
    """
    Autobahn's protocol timers (open and close handshakes, pings), each on its
    own ``callLater``.  Autobahn's own batched timer rounds every deadline
    down to a whole second: a one-second close handshake timeout could fire
    a few milliseconds after the close frame, and its abort threw away the
    last console lines still on their way to the Panel.  The link holds one
    connection, so there is nothing to batch.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _ExactCall:
        return _ExactCall(self._reactor.callLater(max(0.0, delay), func, *args, **kwargs))


class _ExactCall:
    """One of ``_ExactTimer``'s calls; cancelling it again or after it ran does nothing."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class PanelClientFactory(WebSocketClientFactory):
    """The Autobahn factory, knowing the link its protocols forward to."""

    protocol = PanelProtocol  # type: ignore[assignment]

    def __init__(self, link: LinkHooks, url: str, reactor: Any) -> None:
        super().__init__(url, reactor=reactor, useragent="ctrlagent/" + __version__)
        self.link = link
        # Private in Autobahn (txaio's IBatchedTimer); tests/panel pins the name.
        self._batched_timer = _ExactTimer(reactor)
