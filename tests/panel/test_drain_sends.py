"""
The drain settles console frames send by send (``ctrlagent.panel.protocol._Drain``).

On a plain connection, a frame is settled by the very ``send`` that handed
its last byte to the kernel, not at the next time Twisted's buffer is empty:
with a Panel that reads slowly the buffer may never empty, and a SIGKILL
would then repeat every frame the kernel had already taken.  The test here
kills the connection the way a SIGKILL does (Twisted's buffer is gone with
the process, what the kernel took still goes out) at a moment when the
kernel had taken the buffer only in part: the Panel must then get exactly the
frames that were settled, no more (they would repeat) and no fewer (they
would be lost).
"""

from __future__ import annotations

import gc
import inspect
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor

from ctrlagent.events import ConsoleOutput
from ctrlagent.panel.protocol import _buffered

from .test_link_delivery import fill_until_blocked
from .test_link_loopback import Rig, make_rig, sleep, until  # noqa: F401, F811 (fixture)
from .test_link_tls import make_link, tls_panel  # noqa: F401 (fixture)

reactor: Any = _reactor


def test_the_sends_and_the_buffer_the_drain_reads_are_twisteds_own() -> None:
    """A Twisted upgrade that changes these must fail here, not settle lines early."""
    assert "self.writeSomeData(" in inspect.getsource(FileDescriptor.doWrite)
    # What ``_buffered`` reads: the buffer being sent, how far, and the list behind it.
    assert "self._tempDataBuffer.append(data)" in inspect.getsource(FileDescriptor.write)
    assert "self._tempDataLen += len(data)" in inspect.getsource(FileDescriptor.write)
    assert "self.offset += l" in inspect.getsource(FileDescriptor.doWrite)
    connection = tcp.Connection(socket.socket(), None)
    try:
        assert _buffered(connection) == 0
        FileDescriptor.write(connection, b"x")  # not connected: dropped
        connection.connected = True
        connection._tempDataBuffer.append(b"abc")
        connection._tempDataLen += 3
        connection.dataBuffer, connection.offset = b"12345", 2
        assert _buffered(connection) == 6
    finally:
        connection.socket.close()
    assert _buffered(object()) is None


def _kill(transport: Any) -> None:
    """What a SIGKILL does to the agent's side: Twisted's buffer is lost, the kernel's sent."""
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.stopWriting()
    transport.socket.shutdown(socket.SHUT_WR)


@pytest_twisted.ensureDeferred
async def test_a_kill_while_the_kernel_took_part_of_the_buffer_repeats_and_loses_nothing(
    make_rig: Any,  # noqa: F811 (the fixture)
) -> None:
    rig: Rig = make_rig(console_batch_window=0)
    link: Any = rig.link
    panel: Any = rig.panel
    settled: list[int] = []
    collector_on: list[bool] = []

    def event(n: int) -> ConsoleOutput:
        def receipt() -> None:
            settled.append(n)
            collector_on.append(gc.isenabled())

        return ConsoleOutput("s1", "stdout", ["line {} ".format(n) + "x" * 4000], float(n),
                             receipt=receipt)

    link.startService()
    try:
        await until(lambda: link.connected and link._ready and panel.current is not None, 10)
        drain = link._protocol.drain
        assert drain.watching
        link.consumer(event(0))
        await until(lambda: settled == [0], 5)
        # A small kernel buffer (a node's tight ``wmem``): the kernel takes
        # Twisted's buffer a part at a time.
        drain.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        panel.current.transport.pauseProducing()
        n = await fill_until_blocked(link, event, per_turn=5, limit=5_000)
        # Read a little, so that the kernel takes part of the buffer again, then stall.
        panel.current.transport.resumeProducing()
        await sleep(0.002)
        panel.current.transport.pauseProducing()
        await sleep(0.1)
        assert _buffered(drain.socket), "the kernel took the whole buffer: nothing to judge"
        assert 1 < len(settled) < n + 1
        at_kill = list(settled)
        _kill(drain.socket)
        panel.current.transport.resumeProducing()
        await until(lambda: panel.close_times, 10)
    finally:
        await link.stopService().addTimeout(10, reactor)
    received = [
        int(r.frame["data"]["lines"][0].split()[1])
        for r in panel.received
        if r.connection == 0 and r.frame.get("event") == "server_log"
    ]
    assert received == at_kill
    assert at_kill == list(range(len(at_kill)))
    # From the send to the settlement, no collection could run.
    assert not any(collector_on[: len(at_kill)])
    assert gc.isenabled()


@pytest_twisted.ensureDeferred
async def test_under_tls_frames_settle_at_full_drains(
    tls_panel: tuple[Any, int, Any],  # noqa: F811 (the fixture)
) -> None:
    """The socket's buffer holds ciphertext there: no offsets, the full drains settle."""
    panel, port, ca_path = tls_panel
    link: Any = make_link(port, tls_ca=str(ca_path), console_batch_window=0)
    settled: list[int] = []
    link.startService()
    try:
        await until(lambda: link.connected and link._ready, 10)
        drain = link._protocol.drain
        assert drain.registered and not drain.watching
        for n in range(20):
            link.consumer(ConsoleOutput("s1", "stdout", ["line {}".format(n)], float(n),
                                        receipt=lambda n=n: settled.append(n)))
        await until(lambda: len(settled) == 20, 10)
        assert settled == list(range(20))
        await until(lambda: len(panel.console_lines("s1")) == 20, 10)
    finally:
        await link.stopService().addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_a_receipt_that_fails_inside_a_send_is_logged_and_the_link_goes_on(
    make_rig: Any,  # noqa: F811 (the fixture)
    fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    rig: Rig = make_rig(console_batch_window=0)
    link: Any = rig.link
    panel: Any = rig.panel
    settled: list[int] = []

    def broken() -> None:
        raise RuntimeError("a broken receipt")

    link.startService()
    try:
        await until(lambda: link.connected and link._ready, 10)
        assert link._protocol.drain.watching
        link.consumer(ConsoleOutput("s1", "stdout", ["line 1"], 1.0, receipt=broken))
        link.consumer(ConsoleOutput("s1", "stdout", ["line 2"], 2.0,
                                    receipt=lambda: settled.append(2)))
        await until(lambda: settled == [2], 5)
        assert len(fail_on_logged_errors) == 1
        assert "settling console receipts failed" in str(fail_on_logged_errors[0]["log_format"])
        fail_on_logged_errors.clear()
        # The connection stayed up and goes on carrying lines.
        link.consumer(ConsoleOutput("s1", "stdout", ["line 3"], 3.0,
                                    receipt=lambda: settled.append(3)))
        await until(lambda: settled == [2, 3], 5)
        await until(lambda: panel.console_lines("s1") == ["line 1", "line 2", "line 3"], 5)
        assert len(panel.connections) == 1
    finally:
        await link.stopService().addTimeout(10, reactor)
