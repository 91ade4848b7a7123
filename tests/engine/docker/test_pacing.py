"""
The read pacer (``pacing``): many connections read in rounds, over real
Unix socket pairs of the real reactor's; the rounds are timed by a
``Clock`` (the reactor still reads a connection handed back to it).

The real engines' streams are read through it in tests/engine/docker and
tests/engine/podman (``docker.stream_read_interval`` is on by default).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from ctrlagent.engine.docker.pacing import (
    QUIET_ROUNDS,
    READ_SIZE,
    READS_PER_ROUND,
    SWEEP_SECONDS,
    ReadPacer,
)
from ctrlagent.engine.docker.rawhttp import open_stream
from tests.rig.waiting import sleep, until


class Reads(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reads = 0
        self.end: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        self.reads += 1

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.end = reason


class Timed:
    """The real reactor's descriptors with a ``Clock``'s time."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)

    def __getattr__(self, name: str) -> Any:
        if name in ("callLater", "seconds"):
            return getattr(self.clock, name)
        return getattr(reactor, name)


class Pairs:
    """Connections of the reactor's over socket pairs; the far ends are ours."""

    def __init__(self) -> None:
        self.far: list[socket.socket] = []
        self.transports: list[Any] = []
        self.protocols: list[Reads] = []

    def open(self, protocol: Reads | None = None) -> tuple[Any, Reads, socket.socket]:
        near, far = socket.socketpair()
        proto = protocol or Reads()
        transport = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
            near.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: proto)
        )
        near.close()  # the reactor has its own descriptor
        transport = proto.transport
        self.far.append(far)
        self.transports.append(transport)
        self.protocols.append(proto)
        return transport, proto, far

    def close(self) -> None:
        for far in self.far:
            far.close()
        for transport in self.transports:
            if transport.connected:
                transport.abortConnection()


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    p = Pairs()
    yield p
    p.close()


@pytest.fixture
def timed() -> Iterator[Timed]:
    t = Timed()
    yield t


@pytest.fixture
def pacer(timed: Timed) -> Iterator[ReadPacer]:
    p = ReadPacer(timed, 0.01)
    yield p
    p.close()


def test_every_connection_with_data_is_read_in_one_round(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    opened = [pairs.open() for _ in range(50)]
    for transport, proto, _ in opened:
        assert pacer.adopt(transport, proto) is not None
    assert len(pacer) == 50
    for n, (_, _, far) in enumerate(opened):
        far.sendall(b"line %d\n" % n)
    assert not any(p.data for _, p, _ in opened)  # nothing before the round
    timed.clock.advance(0.01)
    assert [p.data for _, p, _ in opened] == [b"line %d\n" % n for n in range(50)]
    assert pacer.rounds == 1 and pacer.reads == 50


def test_rounds_are_an_interval_apart_while_data_comes_and_slow_down_while_none_does(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    pacer.adopt(transport, proto)
    waits = []
    for _ in range(5):  # quiet: 0.01, 0.02, 0.04, then at most QUIET_ROUNDS intervals
        (due,) = timed.clock.getDelayedCalls()
        waits.append(round(due.getTime() - timed.clock.seconds(), 6))
        timed.clock.advance(waits[-1])
    assert waits == [0.01, 0.02, 0.04, 0.01 * QUIET_ROUNDS, 0.01 * QUIET_ROUNDS]
    far.sendall(b"a")
    timed.clock.advance(0.01 * QUIET_ROUNDS)
    assert proto.data == b"a"
    (due,) = timed.clock.getDelayedCalls()  # data came: the next round an interval on
    assert due.getTime() - timed.clock.seconds() == pytest.approx(0.01)
    far.sendall(b"b")
    timed.clock.advance(0.01)
    assert proto.data == b"ab" and pacer.rounds == 7


@pytest_twisted.ensureDeferred
async def test_the_end_of_a_connection_is_reported_by_the_reactor(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    pacer.adopt(transport, proto)
    far.sendall(b"last words")
    far.close()
    for _ in range(3):
        timed.clock.advance(0.01)
    await until(lambda: proto.end is not None, 10, "the end")
    assert proto.data == b"last words"
    assert proto.end is not None and proto.end.check(ConnectionDone)
    assert len(pacer) == 0 and not timed.clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_paused_connection_is_not_read_until_resumed(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    other, other_proto, other_far = pairs.open()
    paced = pacer.adopt(transport, proto)
    pacer.adopt(other, other_proto)
    assert paced is not None
    paced.pause()
    far.sendall(b"held")
    other_far.sendall(b"read")
    timed.clock.advance(0.01)
    assert other_proto.data == b"read" and proto.data == b""
    paced.resume()
    timed.clock.advance(0.01)
    assert proto.data == b"held"
    # Paused when handed back to the reactor: still paused there until resumed.
    paced.pause()
    pacer.close()
    far.sendall(b" still held")
    await sleep(0.1)
    assert proto.data == b"held"
    paced.resume()
    await until(lambda: proto.data == b"held still held", 10, "the reactor's read")


def test_a_backlog_is_read_in_full(pairs: Pairs, timed: Timed, pacer: ReadPacer) -> None:
    transport, proto, far = pairs.open()
    pacer.adopt(transport, proto)
    far.setblocking(False)
    big = bytes(range(256)) * (4 * READ_SIZE // 256 * 8)  # 2 MiB
    sent = 0
    for _ in range(10_000):
        if len(proto.data) == len(big):
            break
        try:
            sent += far.send(big[sent:]) if sent < len(big) else 0
        except BlockingIOError:
            pass
        timed.clock.advance(0.01)
    assert proto.data == big
    # at most READS_PER_ROUND reads of one connection a round
    assert pacer.reads <= pacer.rounds * READS_PER_ROUND


@pytest_twisted.ensureDeferred
async def test_a_released_connection_is_read_by_the_reactor_again(
    pairs: Pairs, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    paced = pacer.adopt(transport, proto)
    assert paced is not None
    paced.release(read=True)
    assert len(pacer) == 0 and pacer.adopt(transport, proto) is not None
    pacer.close()  # every connection back to the reactor; no more taken
    assert pacer.adopt(*pairs.open()[:2]) is None
    far.sendall(b"by the reactor")
    await until(lambda: proto.data == b"by the reactor", 10, "the reactor's read")
    assert pacer.reads == 0


@pytest_twisted.ensureDeferred
async def test_at_the_reactors_shutdown_every_connection_goes_back_to_it(
    pairs: Pairs, timed: Timed
) -> None:
    triggers: list[tuple[str, str, Any]] = []
    timed.addSystemEventTrigger = (  # type: ignore[attr-defined]
        lambda phase, event, f: triggers.append((phase, event, f)) or "trigger")
    timed.removeSystemEventTrigger = (  # type: ignore[attr-defined]
        lambda handle: pytest.fail("a trigger removed while it fires"))
    pacer = ReadPacer(timed, 0.01)
    transport, proto, far = pairs.open()
    pacer.adopt(transport, proto)
    ((phase, event, fire),) = triggers
    assert (phase, event) == ("before", "shutdown")
    fire()
    assert len(pacer) == 0 and not timed.clock.getDelayedCalls()
    far.sendall(b"read by the reactor")
    await until(lambda: proto.data == b"read by the reactor", 10, "the reactor's read")


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_raises_loses_its_connection_only(
    pairs: Pairs, timed: Timed, pacer: ReadPacer, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    class Raises(Reads):
        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            raise RuntimeError("a bug")

    transport, proto, far = pairs.open(Raises())
    other, other_proto, other_far = pairs.open()
    pacer.adopt(transport, proto)
    pacer.adopt(other, other_proto)
    far.sendall(b"x")
    other_far.sendall(b"y")
    timed.clock.advance(0.01)
    assert other_proto.data == b"y"
    await until(lambda: proto.end is not None, 10, "the failed connection's end")
    assert len(pacer) == 1 and other_proto.end is None
    assert any("reading an engine stream failed" in str(e.get("log_format"))
               for e in fail_on_logged_errors)
    fail_on_logged_errors.clear()


def test_only_a_plain_open_socket_is_taken(timed: Timed, pacer: ReadPacer) -> None:
    assert pacer.adopt(StringTransport(), Reads()) is None
    assert len(pacer) == 0 and not timed.clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_streamed_answer_is_read_by_the_pacer_to_its_end(tmp_path: Any) -> None:
    from twisted.internet.endpoints import UNIXClientEndpoint

    pacer = ReadPacer(reactor, 0.01)

    sent: list[Any] = []

    class Engine(Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            sent.append(self.transport)

    port = reactor.listenUNIX(  # type: ignore[attr-defined]
        str(tmp_path / "engine.sock"), Factory.forProtocol(Engine)
    )
    try:
        answer = open_stream(
            UNIXClientEndpoint(reactor, str(tmp_path / "engine.sock")),
            b"GET /containers/x/logs?follow=1 HTTP/1.1\r\nHost: docker\r\n\r\n",
            pacer,
        )
        await until(lambda: sent, 10, "the connection")
        (engine,) = sent
        engine.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = await answer
        body = Reads()
        response.deliverBody(body)
        assert len(pacer) == 1  # the head is in: the body is the pacer's
        for n in range(5):
            engine.write(b"6\r\nline %d\r\n" % n)
            await until(lambda n=n: body.data.endswith(b"line %d" % n), 10, "a line")
        assert pacer.reads >= 5
        body.transport.pauseProducing()  # the consumer's back-pressure reaches the pacer
        engine.write(b"4\r\nheld\r\n")
        await sleep(0.1)
        assert not body.data.endswith(b"held")
        body.transport.resumeProducing()
        await until(lambda: body.data.endswith(b"held"), 10, "the held line")
        engine.write(b"0\r\n\r\n")
        await until(lambda: body.end is not None, 10, "the end")
        assert body.end is not None and body.end.check(ResponseDone)
        assert len(pacer) == 0
        # The consumer closing the stream takes it from the pacer first.
        answer = open_stream(
            UNIXClientEndpoint(reactor, str(tmp_path / "engine.sock")),
            b"GET /events HTTP/1.1\r\nHost: docker\r\n\r\n",
            pacer,
        )
        await until(lambda: len(sent) == 2, 10, "the second connection")
        sent[1].write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        second = Reads()
        (await answer).deliverBody(second)
        assert len(pacer) == 1
        second.transport.stopProducing()
        assert len(pacer) == 0
        await until(lambda: second.end is not None, 10, "the closed stream's end")
    finally:
        pacer.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_paused_connection_whose_peer_hung_up_lets_the_rounds_slow_down(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    paced = pacer.adopt(transport, proto)
    assert paced is not None
    paced.pause()
    far.close()  # reported whatever the interest, were it still in the set
    waits = []
    for _ in range(4):
        (due,) = timed.clock.getDelayedCalls()
        waits.append(round(due.getTime() - timed.clock.seconds(), 6))
        timed.clock.advance(waits[-1])
    assert waits == [0.01, 0.02, 0.04, 0.04]
    assert proto.end is None
    paced.resume()
    timed.clock.advance(0.04)
    await until(lambda: proto.end is not None, 10, "the end after resuming")
    assert proto.end is not None and proto.end.check(ConnectionDone)
    assert len(pacer) == 0


@pytest_twisted.ensureDeferred
async def test_a_reset_connection_ends_with_the_error_not_a_clean_end(
    timed: Timed, pacer: ReadPacer
) -> None:
    import struct

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    listener.close()
    proto = Reads()
    reactor.adoptStreamConnection(  # type: ignore[attr-defined]
        near.fileno(), socket.AF_INET, Factory.forProtocol(lambda: proto)
    )
    near.close()
    pacer.adopt(proto.transport, proto)
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()  # a reset
    timed.clock.advance(0.01)
    await until(lambda: proto.end is not None, 10, "the end")
    assert proto.end is not None and proto.end.check(ConnectionLost)
    assert len(pacer) == 0


def test_a_connection_adopted_during_a_round_keeps_one_timer(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    late_transport, late_proto, late_far = pairs.open()

    class Adopts(Reads):
        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            super().dataReceived(data)
            pacer.adopt(late_transport, late_proto)

    transport, proto, far = pairs.open(Adopts())
    pacer.adopt(transport, proto)
    far.sendall(b"x")
    timed.clock.advance(0.01)
    assert proto.data == b"x" and len(pacer) == 2
    assert len(timed.clock.getDelayedCalls()) == 1
    late_far.sendall(b"y")
    timed.clock.advance(0.01)
    assert late_proto.data == b"y"


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_behind_the_pacers_back_is_dropped(
    pairs: Pairs, timed: Timed, pacer: ReadPacer
) -> None:
    transport, proto, far = pairs.open()
    pacer.adopt(transport, proto)
    transport.abortConnection()  # not through the pacer
    await until(lambda: proto.end is not None, 10, "the abort")
    timed.clock.advance(0.01)  # a quiet round, too soon for a look
    assert len(pacer) == 1
    # Quiet rounds go on; one of the first a second on looks, and drops it.
    for _ in range(int(SWEEP_SECONDS / 0.01) + QUIET_ROUNDS):
        timed.clock.advance(0.01)
        if not len(pacer):
            break
    assert len(pacer) == 0 and not timed.clock.getDelayedCalls()
    assert timed.clock.seconds() - 1000.0 <= SWEEP_SECONDS + QUIET_ROUNDS * 0.01 + 0.02
