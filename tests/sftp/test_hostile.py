"""
Hostile input never crashes the service, blocks its reactor or logs a
traceback (the autouse fixture fails a test on any logged error): garbage
on the SSH port, malformed and oversized SFTP packets, requests before INIT,
bogus handles, absurd lengths, and floods of pipelined requests.  After each,
the service still serves a normal client.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest
import pytest_twisted

from ctrlagent.sftp import wire
from tests.sftp.clients import RawSftp, connect, s
from tests.sftp.conftest import PASSWORD, make_config


def _still_serves(rig):
    def check():
        t, c = connect(rig.port, "srv1", PASSWORD)
        try:
            return c.normalize(".")
        finally:
            t.close()

    return rig.in_thread(check)


def _status(body: bytes) -> tuple[int, int]:
    request_id, code = struct.unpack(">II", body[:8])
    return request_id, code


def _garbage(port: int, payloads: list[bytes]) -> list[bytes]:
    answers = []
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while len(data) < 1 << 20:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answers.append(data)
            except OSError:
                answers.append(b"")
    return answers


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_ssh_port_is_dropped(rig):
    await rig.set_login()
    rnd = random.Random(1234)
    kexinit_like = b"SSH-2.0-fuzz\r\n" + struct.pack(">IB", 2 ** 31, 4) + os.urandom(64)
    payloads = [
        os.urandom(1000),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"SSH-2.0-" + b"A" * 10_000 + b"\r\n",
        kexinit_like,
        b"SSH-2.0-fuzz\r\n" + bytes(rnd.getrandbits(8) for _ in range(5000)),
        b"\x00" * 70_000,
    ]
    await rig.in_thread(_garbage, rig.port, payloads)
    assert await _still_serves(rig) == "/"


def _malformed_ssh_after_login(port):
    """An authenticated client that then sends SSH messages that do not parse."""
    t, c = connect(port, "srv1", PASSWORD)
    try:
        from paramiko.message import Message

        for kind in (90, 98, 94, 93, 80, 96, 97):  # channel open/request/data/window, global
            m = Message()
            m.add_byte(bytes([kind]))
            m.add_bytes(b"\xff\x01")  # far too short for any of them
            try:
                t._send_user_message(m)
            except Exception:
                break
        deadline = time.monotonic() + 5
        while t.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return t.is_active()
    finally:
        t.close()


@pytest_twisted.ensureDeferred
async def test_malformed_ssh_messages_disconnect_without_a_traceback(rig, log_lines):
    await rig.set_login()
    still_active = await rig.in_thread(_malformed_ssh_after_login, rig.port)
    assert still_active is False
    assert any("malformed SSH message" in line for line in log_lines)
    assert await _still_serves(rig) == "/"


def _raw(rig, fn):
    def run():
        raw = RawSftp(rig.port, "srv1", PASSWORD)
        try:
            return fn(raw)
        finally:
            raw.close()

    return rig.in_thread(run)


@pytest.mark.parametrize("case", ["oversized", "undersized", "before-init", "no-request-id"])
@pytest_twisted.ensureDeferred
async def test_unanswerable_packets_close_the_channel(rig, case):
    await rig.set_login()

    def work(raw: RawSftp):
        if case == "before-init":
            raw.send(wire.FXP_OPENDIR, struct.pack(">I", 1) + s(b"/"))
            return raw.closed()
        raw.init()
        if case == "oversized":
            raw.send_raw(struct.pack(">IB", 0x7FFFFFFF, wire.FXP_WRITE) + b"x" * 1000)
        elif case == "undersized":
            raw.send_raw(struct.pack(">I", 1) + b"\x05")
        else:
            raw.send_raw(struct.pack(">IB", 3, wire.FXP_READ) + b"\x00\x00")
        return raw.closed()

    assert await _raw(rig, work) is True
    assert await _still_serves(rig) == "/"


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_status_codes(rig):
    await rig.set_login()
    (rig.root() / "f").write_bytes(b"0123456789")

    def work(raw: RawSftp):
        raw.init()
        out = {}

        def ask(name, kind, body):
            raw.send(kind, body)
            k, b = raw.recv()
            out[name] = (k, b)

        rid = struct.pack(">I", 7)
        ask("bogus read handle", wire.FXP_READ, rid + s(b"nope") + struct.pack(">QI", 0, 10))
        ask("bogus write handle", wire.FXP_WRITE, rid + s(b"nope") + struct.pack(">Q", 0)
            + s(b"x"))
        ask("bogus close", wire.FXP_CLOSE, rid + s(b"\x00" * 8))
        ask("bogus readdir", wire.FXP_READDIR, rid + s(b"12345678"))
        ask("trailing bytes", wire.FXP_STAT, rid + s(b"/f") + b"extra")
        ask("short string", wire.FXP_STAT, rid + struct.pack(">I", 1000) + b"abc")
        ask("nul in path", wire.FXP_STAT, rid + s(b"/f\x00/etc/passwd"))
        ask("overlong name", wire.FXP_STAT, rid + s(b"/" + b"a" * 300))
        ask("unknown type", 77, rid + b"whatever")
        ask("unknown extension", wire.FXP_EXTENDED, rid + s(b"copy-data") + b"junk")
        ask("too many ext attrs", wire.FXP_SETSTAT, rid + s(b"/f")
            + struct.pack(">II", wire.ATTR_EXTENDED, 10_000_000))
        # An absurd read length is capped, not honoured.
        raw.send(wire.FXP_OPEN, rid + s(b"/f") + struct.pack(">II", wire.FXF_READ, 0))
        k, b = raw.recv()
        assert k == wire.FXP_HANDLE
        handle = b[8:8 + struct.unpack(">I", b[4:8])[0]]
        ask("huge read", wire.FXP_READ, rid + s(handle) + struct.pack(">QI", 0, 0xFFFFFFFF))
        ask("far read", wire.FXP_READ, rid + s(handle) + struct.pack(">QI", 2 ** 64 - 1, 10))
        ask("limits", wire.FXP_EXTENDED, rid + s(b"limits@openssh.com"))
        return out

    out = await _raw(rig, work)
    expect = {
        "bogus read handle": wire.FX_FAILURE,
        "bogus write handle": wire.FX_FAILURE,
        "bogus close": wire.FX_FAILURE,
        "bogus readdir": wire.FX_FAILURE,
        "trailing bytes": wire.FX_BAD_MESSAGE,
        "short string": wire.FX_BAD_MESSAGE,
        "nul in path": wire.FX_BAD_MESSAGE,
        "overlong name": wire.FX_BAD_MESSAGE,
        "unknown type": wire.FX_OP_UNSUPPORTED,
        "unknown extension": wire.FX_OP_UNSUPPORTED,
        "too many ext attrs": wire.FX_BAD_MESSAGE,
        "far read": wire.FX_EOF,
    }
    for name, code in expect.items():
        kind, body = out[name]
        assert kind == wire.FXP_STATUS, name
        assert _status(body) == (7, code), name
    kind, body = out["huge read"]
    assert kind == wire.FXP_DATA and body[8:] == b"0123456789"
    kind, body = out["limits"]
    assert kind == wire.FXP_EXTENDED_REPLY
    max_packet, max_read, max_write, _ = struct.unpack(">4Q", body[4:])
    assert (max_packet, max_read, max_write) == (wire.MAX_PACKET, wire.MAX_READ, wire.MAX_WRITE)


@pytest_twisted.ensureDeferred
async def test_handles_are_bounded_per_session(rig):
    await rig.set_login()
    limit = rig.service.config.max_handles

    def work(raw: RawSftp):
        raw.init()
        codes = []
        for i in range(limit + 5):
            raw.send(wire.FXP_OPENDIR, struct.pack(">I", i) + s(b"/"))
            kind, body = raw.recv()
            codes.append(kind)
        return codes

    codes = await _raw(rig, work)
    assert codes[:limit] == [wire.FXP_HANDLE] * limit
    assert codes[limit:] == [wire.FXP_STATUS] * 5


@pytest_twisted.ensureDeferred
async def test_a_flood_of_pipelined_requests_is_answered_in_order_of_work(rig):
    """5000 requests at once: all answered, at most MAX_IN_FLIGHT run at a time."""
    await rig.set_login()
    from ctrlagent.sftp import protocol

    peak = {"n": 0}
    original = protocol.SftpProtocol._request_done

    def count(self, result):
        peak["n"] = max(peak["n"], self._in_flight)
        return original(self, result)

    protocol.SftpProtocol._request_done = count  # type: ignore[method-assign]
    try:
        def work(raw: RawSftp):
            raw.init()
            burst = b"".join(struct.pack(">IBI", 5 + 4 + 1, wire.FXP_LSTAT, i) + s(b"/")
                             for i in range(5000))
            raw.send_raw(burst)
            seen = set()
            for _ in range(5000):
                kind, body = raw.recv()
                assert kind == wire.FXP_ATTRS
                seen.add(struct.unpack(">I", body[:4])[0])
            return seen

        seen = await _raw(rig, work)
    finally:
        protocol.SftpProtocol._request_done = original  # type: ignore[method-assign]
    assert seen == set(range(5000))
    assert 0 < peak["n"] <= protocol.MAX_IN_FLIGHT


@pytest_twisted.ensureDeferred
async def test_random_packets_never_break_the_session(rig):
    """A bounded run of random well-framed packets: each gets an answer or none, never a crash."""
    await rig.set_login()
    (rig.root() / "f").write_bytes(b"data")
    rnd = random.Random(20261201)

    def work(raw: RawSftp):
        raw.init()
        for i in range(400):
            kind = rnd.choice([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                               200, rnd.randrange(256)])
            body = struct.pack(">I", i) + bytes(rnd.getrandbits(8)
                                                for _ in range(rnd.choice([0, 1, 4, 9, 40, 300])))
            raw.send(kind, body)
        # Then a well-formed request is answered (after whatever the fuzz got).
        raw.send(wire.FXP_REALPATH, struct.pack(">I", 99999) + s(b"."))
        for _ in range(1000):
            kind, body = raw.recv()
            if kind == wire.FXP_NAME and body[:4] == struct.pack(">I", 99999):
                return True
        return False

    assert await _raw(rig, work) is True
    assert await _still_serves(rig) == "/"
    outside = sorted(p.name for p in rig.outside.iterdir())
    assert outside == ["canary.txt"]


@pytest_twisted.ensureDeferred
async def test_requests_answered_at_once_do_not_nest(rig):
    """20000 instant answers (REALPATH, bogus handles) in one burst: no recursion, all answered."""
    await rig.set_login()

    def work(raw: RawSftp):
        raw.init()
        burst = []
        for i in range(10_000):
            burst.append(struct.pack(">IBI", 5 + 4 + 1, wire.FXP_REALPATH, i) + s(b"/"))
            burst.append(struct.pack(">IBI", 5 + 4 + 4, wire.FXP_CLOSE, 10_000 + i) + s(b"xxxx"))
        raw.send_raw(b"".join(burst))
        got = 0
        for _ in range(20_000):
            raw.recv()
            got += 1
        return got

    assert await _raw(rig, work) == 20_000


@pytest.mark.parametrize("sftp_config", [make_config(login_timeout=0.5)])
@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_dropped_at_the_login_timeout(rig):
    def silent():
        with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as sock:
            start = time.monotonic()
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return time.monotonic() - start, data
                data += chunk

    elapsed, data = await rig.in_thread(silent)
    assert data.startswith(b"SSH-2.0-")
    assert 0.3 < elapsed < 3.0
