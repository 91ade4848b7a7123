"""
The Panel link as the manager's acknowledging console consumer
(``ctrlagent.servers.delivery``): an event's receipt is settled once the
kernel has taken the frame carrying its last line, never when it is only
batched, queued in the outbox or written into Twisted's buffer; an event the
outbox drops is settled as dropped; frames the kernel never took go out first
on the next connection.

In memory (``iosim``), "the kernel took it" is the pump moving the bytes (the
fake transport then calls the link's pull producer, as a real transport does
after ``doWrite`` emptied its buffer).  On loopback TCP and TLS, the real
transports do it, and a stop still closes the connection (a registered pull
producer must let go for ``loseConnection`` to finish).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ctrlagent.events import ConsoleOutput
from ctrlagent.interfaces import IConsoleConsumer
from ctrlagent.panel.outbox import ConsoleBatcher
from ctrlagent.panel.protocol import PanelClientFactory, _Drain, _held_above, _socket_transport
from ctrlagent.testing.panel import FakePanel
from ctrlagent.wire import frames as outgoing

from .harness import Harness
from .test_link_loopback import Rig, make_rig, sleep, until  # noqa: F401 (fixture)
from .test_link_tls import make_link, tls_panel  # noqa: F401 (fixture)

reactor: Any = _reactor


class Receipts:
    """Receipts for numbered events, and which were settled."""

    def __init__(self) -> None:
        self.settled: list[int] = []

    def event(self, n: int, server_id: str = "s1", lines: int = 1, width: int = 0) -> ConsoleOutput:
        text = [("line {} ".format(n) + "x" * width).strip() + (" .{}".format(i) if i else "")
                for i in range(lines)]
        return ConsoleOutput(server_id, "stdout", text, float(n), receipt=self._settle(n))

    def _settle(self, n: int) -> Callable[[], None]:
        return lambda: self.settled.append(n)


def test_the_link_is_an_acknowledging_consumer() -> None:
    rig = Harness()
    assert IConsoleConsumer.providedBy(rig.link.consumer)


def test_a_receipt_is_settled_when_the_kernel_takes_the_frame_not_when_it_is_written() -> None:
    rig = Harness(console_batch_window=0)
    rig.start()
    receipts = Receipts()
    rig.link.consumer(receipts.event(1))
    # written to the transport, still in its buffer: not delivered
    assert rig.endpoint.pumps[-1].clientIO.stream
    assert receipts.settled == []
    rig.flush()
    assert rig.panel.console_lines("s1") == ["line 1"]
    assert receipts.settled == [1]


def test_lines_in_the_batch_window_are_settled_only_once_sent_and_taken() -> None:
    rig = Harness(console_batch_window=1.0, console_batch_lines=3)
    rig.start()
    receipts = Receipts()
    rig.link.consumer(receipts.event(1, lines=2))
    rig.link.consumer(receipts.event(2, lines=2))  # its last line is in the second frame
    rig.flush()
    assert rig.panel.console_lines("s1") == ["line 1", "line 1 .1", "line 2"]
    assert receipts.settled == [1]
    rig.advance(1.0)  # the window is over; the frame leaves within its slack
    rig.advance(0.5)
    assert receipts.settled == [1, 2]


def test_a_receipt_goes_with_the_frame_that_carries_its_events_last_line() -> None:
    frames: list[tuple[list[str], list[int]]] = []
    settled: list[int] = []

    def deliver(sid: str, stream: str, lines: list[str], ts: float, receipts: Any) -> None:
        before = len(settled)
        for receipt in receipts:
            receipt()
        frames.append((lines, settled[before:]))

    clock = Clock()
    batcher = ConsoleBatcher(clock, 3, 1.0, deliver)

    def event(n: int, lines: list[str]) -> ConsoleOutput:
        return ConsoleOutput("a", "stdout", lines, 0.0, receipt=lambda: settled.append(n))

    batcher.add(event(1, ["1a", "1b"]))
    batcher.add(event(2, ["2a", "2b", "2c", "2d"]))  # cut: 2a | 2b 2c 2d
    batcher.add(event(3, ["3a"]))
    batcher.add(event(4, []))  # nothing to send: settled at once
    assert settled == [1, 2, 4]  # 3 still waits in the window
    assert frames == [(["1a", "1b", "2a"], [1]), (["2b", "2c", "2d"], [2])]
    clock.advance(1.0)
    assert frames[2:] == [(["3a"], [3])]


def test_lines_in_the_outbox_wait_and_one_the_outbox_drops_is_settled_as_dropped() -> None:
    rig = Harness(console_batch_window=0, outbox_size=2)
    rig.endpoint.refuse = True
    rig.start()
    receipts = Receipts()
    for n in (1, 2, 3):
        rig.link.consumer(receipts.event(n))
    # the first was dropped (the Panel will be told): it never will be delivered
    assert receipts.settled == [1]
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    assert rig.panel.frames("events_dropped")[0]["data"]["dropped"] == 1
    assert rig.panel.console_lines("s1") == ["line 2", "line 3"]
    assert receipts.settled == [1, 2, 3]


def test_lines_queued_while_the_link_is_down_are_encoded_only_when_they_go_out(
    monkeypatch: Any, fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    # At hundreds of servers a Panel outage queues a console frame per line:
    # encoding those the outbox then drops was most of a line's cost.
    encoded: list[int] = []
    frames = outgoing.console_frames

    def counting(server_id: str, stream: str, lines: list[str], *args: Any, **kw: Any) -> Any:
        encoded.append(int(lines[0].split()[1]))
        if lines[0] == "line 4":
            raise ValueError("cannot encode this one")
        return frames(server_id, stream, lines, *args, **kw)

    monkeypatch.setattr(outgoing, "console_frames", counting)
    rig = Harness(console_batch_window=0, outbox_size=3)
    rig.endpoint.refuse = True
    rig.start()
    receipts = Receipts()
    for n in (1, 2, 3, 4, 5):
        rig.link.consumer(receipts.event(n))
    assert encoded == []  # queued as they came, none encoded
    assert receipts.settled == [1, 2]  # dropped unencoded
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    assert encoded == [3, 4, 5]
    # the one that cannot be encoded is dropped (settled), the rest goes out in order
    assert rig.panel.console_lines("s1") == ["line 3", "line 5"]
    assert sorted(receipts.settled) == [1, 2, 3, 4, 5]
    # (our own bug, not the input's: said with its traceback)
    assert [e["log_format"] for e in fail_on_logged_errors] == [
        "could not encode console lines for the Panel"]
    fail_on_logged_errors.clear()


def test_frames_the_kernel_never_took_go_out_first_on_the_next_connection() -> None:
    rig = Harness(console_batch_window=0)
    rig.start()
    receipts = Receipts()
    rig.link.consumer(receipts.event(1))
    rig.flush()
    rig.link.consumer(receipts.event(2))
    rig.link.consumer(receipts.event(3))
    # the connection dies with both frames still in the agent's buffer: the
    # bytes are lost, and the dying transport stops its producer
    io = rig.endpoint.pumps[-1].clientIO
    io.stream.clear()
    io.producer.stopProducing()
    io.producer = None
    io.abortConnection()
    rig.flush()
    assert not rig.link.connected
    rig.link.consumer(receipts.event(4))  # while down: behind them
    assert receipts.settled == [1]
    rig.advance(rig.next_retry_delay())
    assert rig.link.connected
    assert rig.panel.console_lines("s1") == ["line 1", "line 2", "line 3", "line 4"]
    assert [r.connection for r in rig.panel.received
            if r.frame.get("event") == "server_log"] == [0, 1, 1, 1]
    assert receipts.settled == [1, 2, 3, 4]


def test_frames_taken_while_autobahn_drops_the_connection_are_settled_not_sent_again() -> None:
    rig = Harness(console_batch_window=0)
    rig.start()
    receipts = Receipts()
    protocol = rig.link._protocol
    assert protocol is not None
    rig.link.consumer(receipts.event(1))  # written, not yet taken
    protocol.dropConnection(abort=False)  # as after a close handshake or a timeout
    io = rig.endpoint.pumps[-1].clientIO
    assert io.producer is protocol.drain
    rig.flush()  # the bytes leave, then the connection closes
    assert not rig.link.connected
    assert receipts.settled == [1]
    rig.advance(rig.next_retry_delay())
    assert rig.link.connected
    assert rig.panel.console_lines("s1") == ["line 1"]


def test_a_backed_up_socket_queues_events_until_it_drains_then_settles_in_order() -> None:
    rig = Harness(console_batch_window=0, console_batch_lines=100)
    rig.start()
    receipts = Receipts()
    rig.link.consumer(receipts.event(1, lines=100, width=1000))  # about 100 KB in one frame
    protocol = rig.link._protocol
    assert protocol is not None and protocol.drain is not None
    assert protocol.drain.paused and rig.link._paused
    rig.link.consumer(receipts.event(2))
    assert len(rig.link.outbox) == 1  # waits: the Panel is not reading yet
    rig.flush()
    assert not rig.link._paused and len(rig.link.outbox) == 0
    assert receipts.settled == [1, 2]
    assert rig.panel.console_lines("s1")[-1] == "line 2"


def test_a_drain_waits_for_bytes_still_held_above_the_socket() -> None:
    socket = StringTransport()
    factory = TLSMemoryBIOFactory(
        optionsForClientTLS("localhost"), True, Factory.forProtocol(Protocol)
    )
    tls: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    tls.makeConnection(socket)

    class Top:
        send_queue: list[bytes] = []
        transport = tls

    assert _socket_transport(tls) is socket
    assert not _held_above(Top(), socket)
    tls._appSendBuffer.append(b"before the handshake")
    assert _held_above(Top(), socket)
    tls._appSendBuffer.clear()
    tls._aggregator._buffer.append(b"a small write, flushed next turn")
    assert _held_above(Top(), socket)
    tls._aggregator._buffer.clear()
    Top.send_queue = [b"chopped"]
    assert _held_above(Top(), socket)


def test_the_private_buffers_the_drain_looks_at_keep_their_names() -> None:
    """A Twisted or Autobahn upgrade that renames them must fail here, not lose lines."""
    factory = TLSMemoryBIOFactory(
        optionsForClientTLS("localhost"), True, Factory.forProtocol(Protocol)
    )
    tls: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    tls.makeConnection(StringTransport())
    assert isinstance(tls, TLSMemoryBIOProtocol)
    # set on the layer itself (ProtocolWrapper forwards unknown names down)
    assert "_appSendBuffer" in vars(tls) and "_aggregator" in vars(tls)
    assert tls._appSendBuffer == []
    assert tls._aggregator._buffer == []
    # Autobahn queues chopped or synchronous writes in ``send_queue``.
    assert "self.send_queue" in inspect.getsource(WebSocketProtocol.sendData)
    assert issubclass(WebSocketClientProtocol, WebSocketProtocol)

@pytest_twisted.ensureDeferred
async def test_a_connection_we_close_still_closes_with_the_drain_registered() -> None:
    """A pull producer holds ``loseConnection`` until unregistered: the drain lets go."""
    quiet = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    lost: Deferred[None] = Deferred()

    class Client(Protocol):
        send_queue: list[bytes] = []

        def connectionLost(self, reason: Any = None) -> None:
            lost.callback(None)

    class Link:
        def writes_paused(self, protocol: Any) -> None:
            pass

        def writes_resumed(self, protocol: Any) -> None:
            pass

    try:
        client = await ClientCreator(reactor, Client).connectTCP(
            "127.0.0.1", quiet.getHost().port
        )
        drain = _Drain(Link(), client)  # type: ignore[arg-type]
        drain.start()
        assert drain.registered and client.transport.producer is drain
        client.transport.write(b"x" * 1000)
        client.transport.loseConnection()  # the Panel side never closes
        await lost.addTimeout(5, reactor)
        assert not drain.registered
    finally:
        await quiet.stopListening()


async def _flood_and_stop(link: Any, panel: FakePanel) -> None:
    receipts = Receipts()
    link.startService()
    try:
        await until(lambda: link.connected and link._ready, 10)
        for n in range(1, 201):
            link.consumer(receipts.event(n, width=200))
            if n % 20 == 0:
                # written, not yet taken: Twisted writes on its next turn
                assert receipts.settled[-1:] != [n]
                await sleep(0.005)
        await until(lambda: len(receipts.settled) >= 190, 10)
        for n in range(201, 211):
            link.consumer(receipts.event(n))  # in the batch window when the stop comes
    finally:
        await link.stopService().addTimeout(10, reactor)
    assert receipts.settled == list(range(1, 211))
    await until(lambda: len(panel.console_lines("s1")) == 210, 15)


@pytest.fixture(params=["loopback_tcp", "tls"])
def batching_link(request: pytest.FixtureRequest) -> tuple[Any, FakePanel]:
    """A link batching 7 lines or 0.05 s, and its Panel, over plain TCP or TLS."""
    if request.param == "loopback_tcp":
        rig = request.getfixturevalue("make_rig")(console_batch_window=0.05,
                                                  console_batch_lines=7)
        return rig.link, rig.panel
    panel, port, ca_path = request.getfixturevalue("tls_panel")
    link = make_link(port, tls_ca=str(ca_path), console_batch_window=0.05, console_batch_lines=7)
    return link, panel


@pytest_twisted.ensureDeferred
async def test_receipts_settle_after_the_write_and_a_stop_still_closes(
    batching_link: tuple[Any, FakePanel],
) -> None:
    await _flood_and_stop(*batching_link)


async def fill_until_blocked(
    link: Any, event: Callable[[int], ConsoleOutput], per_turn: int, limit: int
) -> int:
    """
    Hand the link events 1, 2, ... (``per_turn`` a reactor turn, at most
    ``limit``) until its writes have stayed paused for 0.3 s: the kernel
    takes no more, and the rest waits in the agent.  Returns the last event.
    """
    n = 0
    blocked_since = None
    while n < limit:  # bounded: the kernel's buffers fill after a few MB at most
        for _ in range(per_turn):
            n += 1
            link.consumer(event(n))
        await sleep(0.01)
        if not link._paused:
            blocked_since = None
        elif blocked_since is None:
            blocked_since = reactor.seconds()
        elif reactor.seconds() - blocked_since > 0.3:
            break
    return n


async def _stop_while_the_panel_is_not_reading(link: Any, panel: FakePanel) -> None:
    """
    The Panel stops reading; the agent writes until the kernel's buffers are
    full and it holds the rest; the stop comes, and the Panel reads again only
    1.5 s later, past Autobahn's default close handshake timeout.  Every line
    whose receipt was settled (the kernel took it) reaches the Panel.
    """
    receipts = Receipts()
    stopped = None
    link.startService()
    try:
        await until(lambda: link.connected and link._ready and panel.current is not None, 10)
        panel.current.transport.pauseProducing()
        await fill_until_blocked(
            link, lambda n: receipts.event(n, width=4000), per_turn=50, limit=20_000
        )
        assert link._paused and len(receipts.settled) > 100
        stopped = link.stopService()
        await sleep(1.5)
        panel.current.transport.resumeProducing()
    finally:
        if stopped is None:
            stopped = link.stopService()
        await stopped.addTimeout(10, reactor)
    settled = len(receipts.settled)
    assert receipts.settled == list(range(1, settled + 1))
    await until(lambda: len(panel.console_lines("s1")) >= settled, 10)
    lines = panel.console_lines("s1")
    assert lines[:settled] == ["line {} ".format(k) + "x" * 4000 for k in range(1, settled + 1)]


@pytest_twisted.ensureDeferred
async def test_a_stop_gives_a_panel_slow_to_read_its_last_lines(
    batching_link: tuple[Any, FakePanel],
) -> None:
    await _stop_while_the_panel_is_not_reading(*batching_link)


def test_the_links_protocol_timers_fire_on_time_not_rounded_to_a_second() -> None:
    """Autobahn's batched timer rounds deadlines down to a whole second."""
    clock = Clock()
    factory = PanelClientFactory(None, "ws://127.0.0.1:1/ws", clock)  # type: ignore[arg-type]
    fired: list[str] = []
    clock.advance(0.99)
    call = factory._batched_timer.call_later(1.0, fired.append, "close timeout")
    clock.advance(0.5)
    assert fired == []  # Autobahn's own would have fired at 1.0
    clock.advance(0.5)
    assert fired == ["close timeout"]
    call.cancel()  # after it ran: nothing
    other = factory._batched_timer.call_later(2.0, fired.append, "ping timeout")
    other.cancel()
    other.cancel()
    clock.advance(5)
    assert fired == ["close timeout"]
