"""
The SFTP channel's output queue (unit, no network): answers wait for the
client's window in order, go out in packets no bigger than the client
allows, a close waits for them, and the SFTP protocol takes no new request
while too much waits.
"""

from __future__ import annotations

import struct

from ctrlagent.sftp import protocol as sftp_protocol
from ctrlagent.sftp import wire
from ctrlagent.sftp.ssh import SftpSessionChannel


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = 0

    def sendData(self, channel, data):  # noqa: N802
        self.sent.append(bytes(data))

    def sendClose(self, channel):  # noqa: N802
        self.closed += 1


class FakeProtocol:
    def __init__(self) -> None:
        self.drained = 0

    def output_drained(self) -> None:
        self.drained += 1


def _channel(window: int, packet: int) -> tuple[SftpSessionChannel, FakeConn]:
    conn = FakeConn()
    chan = SftpSessionChannel(remoteWindow=window, remoteMaxPacket=packet, conn=conn)
    return chan, conn


def test_output_waits_for_the_window_in_order_and_in_small_packets():
    chan, conn = _channel(window=100, packet=40)
    chan.protocol = FakeProtocol()  # type: ignore[assignment]
    chan.write(b"a" * 70)
    chan.write(b"b" * 70)
    assert b"".join(conn.sent) == b"a" * 70 + b"b" * 30
    assert all(len(p) <= 40 for p in conn.sent)
    assert chan.pending_bytes == 40 and chan.remoteWindowLeft == 0
    chan.addWindowBytes(25)
    assert b"".join(conn.sent) == b"a" * 70 + b"b" * 55 and chan.pending_bytes == 15
    assert chan.protocol.drained == 0
    chan.addWindowBytes(1000)
    assert b"".join(conn.sent) == b"a" * 70 + b"b" * 70 and chan.pending_bytes == 0
    assert chan.protocol.drained == 1


def test_close_waits_for_pending_output():
    chan, conn = _channel(window=10, packet=10)
    chan.write(b"x" * 25)
    chan.loseConnection()
    assert conn.closed == 0
    chan.addWindowBytes(10)
    assert conn.closed == 0
    chan.addWindowBytes(10)
    assert conn.closed == 1 and b"".join(conn.sent) == b"x" * 25


def test_a_large_backlog_is_linear_not_quadratic():
    chan, conn = _channel(window=0, packet=32768)
    for _ in range(2000):
        chan.write(b"y" * 65536)  # 125 MiB queued: a bytes buffer would copy it 2000 times
    assert chan.pending_bytes == 2000 * 65536
    chan.addWindowBytes(2000 * 65536)
    assert chan.pending_bytes == 0 and len(conn.sent) == 4000


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:  # noqa: N802
        pass


def test_the_protocol_takes_no_request_while_answers_wait():
    backlog = [sftp_protocol.MAX_BACKLOG]
    proto = sftp_protocol.SftpProtocol(fs=_Fs(), backlog=lambda: backlog[0])  # type: ignore[arg-type]
    transport = _Transport()
    proto.makeConnection(transport)  # type: ignore[arg-type]
    init = wire.packet(wire.FXP_INIT, struct.pack(">I", 3))
    realpath = wire.packet(wire.FXP_REALPATH, struct.pack(">I", 1) + wire.string(b"."))
    backlog[0] = 0
    proto.dataReceived(init)
    assert len(transport.written) == 1  # VERSION
    backlog[0] = sftp_protocol.MAX_BACKLOG
    proto.dataReceived(realpath)
    assert len(transport.written) == 1  # waits
    backlog[0] = 0
    proto.output_drained()
    assert len(transport.written) == 2 and transport.written[1][4] == wire.FXP_NAME


class _Fs:
    def gotVersion(self, version, ext):  # noqa: N802
        return {}

    def realPath(self, path):  # noqa: N802
        return wire.display(wire.components(path))
