"""
The drain settles console frames send by send (``ctrlagent.panel.protocol._Drain``).

On a real socket, a frame is settled by the very ``send`` that handed its
last byte to the kernel, not at the next time Twisted's buffer is empty: with
a Panel that reads slowly, the buffer may never empty, and a SIGKILL would
then repeat every frame the kernel had already taken.  These tests check the
drain's byte counts against Twisted's own buffer at every settlement, that
the collector is held off from the send to the settlement, and that a count
that disagrees falls back, once and loudly, to settling at full drains.
"""

from __future__ import annotations

import gc
import inspect
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from ctrlagent.events import ConsoleOutput
from ctrlagent.panel.protocol import _Drain

from .test_link_loopback import Rig, make_rig, sleep, until  # noqa: F401, F811 (fixture)

reactor: Any = _reactor


def _twisted_pending(socket: Any) -> int:
    """The bytes waiting in Twisted's buffer of ``socket`` (its private attributes)."""
    return int(len(socket.dataBuffer) - socket.offset + socket._tempDataLen)


def test_the_sends_the_drain_counts_are_twisteds_own() -> None:
    """A Twisted upgrade that changes these must fail here, not settle lines early."""
    do_write = inspect.getsource(FileDescriptor.doWrite)
    assert "self.writeSomeData(" in do_write
    # With less than SEND_LIMIT left, everything pending is joined into what is offered.
    assert "self.SEND_LIMIT" in do_write and "self._tempDataBuffer" in do_write
    assert "self._tempDataBuffer.append(data)" in inspect.getsource(FileDescriptor.write)
    assert "self._tempDataBuffer.extend(iovec)" in inspect.getsource(
        FileDescriptor.writeSequence
    )


@pytest_twisted.ensureDeferred
async def test_frames_the_kernel_took_are_settled_by_that_send_not_at_the_next_empty_buffer(
    make_rig: Any,  # noqa: F811 (the fixture)
) -> None:
    rig: Rig = make_rig(console_batch_window=0)
    link: Any = rig.link
    panel: Any = rig.panel
    # (event, bytes still in the buffer after the send that settled it, the collector on)
    settlements: list[tuple[int, int, bool]] = []
    # (Twisted's pending bytes, the drain's count of them), between reactor turns
    counts: list[tuple[int, int]] = []

    def compare() -> None:
        drain = link._protocol.drain
        counts.append((_twisted_pending(drain.socket), drain.written - drain.taken))

    def event(n: int) -> ConsoleOutput:
        def settled() -> None:
            drain = link._protocol.drain
            settlements.append((n, drain.written - drain.taken, gc.isenabled()))
            # Twisted updates its buffer once the send returns: compare after.
            reactor.callLater(0, compare)

        return ConsoleOutput("s1", "stdout", ["line {} ".format(n) + "x" * 4000], float(n),
                             receipt=settled)

    link.startService()
    try:
        await until(lambda: link.connected and link._ready and panel.current is not None, 10)
        drain = link._protocol.drain
        assert drain.watching
        # A small kernel buffer (a node's tight ``wmem``): the kernel then
        # takes Twisted's buffer a part at a time.
        drain.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        link.consumer(event(0))
        await until(lambda: settlements, 5)
        assert drain.counting  # the first send emptied the buffer
        panel.current.transport.pauseProducing()
        n = 0
        blocked_since = None
        while n < 20_000:  # bounded: the kernel's buffers fill after a few MB
            for _ in range(20):
                n += 1
                link.consumer(event(n))
            await sleep(0.01)
            if not link._paused:
                blocked_since = None
            elif blocked_since is None:
                blocked_since = reactor.seconds()
            elif reactor.seconds() - blocked_since > 0.3:
                break  # the kernel takes no more
        panel.current.transport.resumeProducing()
        await until(lambda: len(settlements) == n + 1, 10)
        settled_while_full = [s for s in settlements if s[1] > 0]
        # Frames were settled while Twisted's buffer still held later ones ...
        assert len(settled_while_full) > 10, settlements[-5:]
        # ... and the drain's count of that buffer was Twisted's own every time.
        assert counts and all(pending == counted for pending, counted in counts), counts
        # From the send to the settlement, no collection could run.
        assert not any(collector for *_, collector in settlements)
        assert gc.isenabled()
    finally:
        await link.stopService().addTimeout(10, reactor)
    assert [s[0] for s in settlements] == list(range(n + 1))
    await until(lambda: len(panel.console_lines("s1")) == n + 1, 10)
    assert not drain.disagreed


@pytest_twisted.ensureDeferred
async def test_a_write_the_drain_did_not_count_makes_it_settle_at_full_drains_only() -> None:
    """Bytes put in Twisted's buffer past the count: said once, then full drains only."""
    quiet = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    warnings: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "send count disagrees" in str(event.get("log_format", "")):
            warnings.append(event)

    class Client(Protocol):
        send_queue: list[bytes] = []

    class Link:
        def writes_paused(self, protocol: Any) -> None:
            pass

        def writes_resumed(self, protocol: Any) -> None:
            pass

    globalLogPublisher.addObserver(observe)
    client = None
    try:
        client = await ClientCreator(reactor, Client).connectTCP(
            "127.0.0.1", quiet.getHost().port
        )
        drain = _Drain(Link(), client)  # type: ignore[arg-type]
        drain.start()
        settled: list[int] = []
        client.transport.write(b"a" * 100)
        drain.expect((b"a",), (lambda: settled.append(1),))
        await until(lambda: settled == [1], 5)
        assert drain.counting
        # Past the count: straight into Twisted's buffer.
        FileDescriptor.write(client.transport, b"b" * 100)
        client.transport.write(b"c" * 100)
        drain.expect((b"c",), (lambda: settled.append(2),))
        assert drain.groups[-1][2] is not None  # at an offset the count got wrong
        await until(lambda: settled == [1, 2], 5)  # at the full drain
        assert drain.disagreed and not drain.counting
        assert len(warnings) == 1
        client.transport.write(b"d" * 100)
        drain.expect((b"d",), (lambda: settled.append(3),))
        assert drain.groups[-1][2] is None  # no offsets any more
        await until(lambda: settled == [1, 2, 3], 5)
        assert len(warnings) == 1
    finally:
        globalLogPublisher.removeObserver(observe)
        if client is not None:
            client.transport.abortConnection()
        await quiet.stopListening()
        await sleep(0.01)
