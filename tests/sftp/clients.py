"""Blocking SFTP clients for the tests (run them in ``Rig.in_thread``)."""

from __future__ import annotations

import struct

import paramiko


def connect(port: int, username: str, password: str | None = None,
            pkey: paramiko.PKey | None = None) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """A paramiko SFTP session on 127.0.0.1:port."""
    t = paramiko.Transport(("127.0.0.1", port))
    t.banner_timeout = 10
    try:
        t.connect(username=username, password=password, pkey=pkey)
        sftp = paramiko.SFTPClient.from_transport(t)
    except BaseException:
        t.close()
        raise
    assert sftp is not None
    return t, sftp


class RawSftp:
    """The SFTP subsystem as raw packets, to send what no client would."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.transport, sftp = connect(port, username, password)
        sftp.close()
        self.chan = self.transport.open_session()
        self.chan.settimeout(10)
        self.chan.invoke_subsystem("sftp")

    def send_raw(self, data: bytes) -> None:
        self.chan.sendall(data)

    def send(self, kind: int, body: bytes) -> None:
        self.chan.sendall(struct.pack(">IB", len(body) + 1, kind) + body)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.chan.recv(n - len(out))
            if not chunk:
                raise EOFError("channel closed")
            out += chunk
        return out

    def recv(self) -> tuple[int, bytes]:
        (length,) = struct.unpack(">I", self._exactly(4))
        body = self._exactly(length)
        return body[0], body[1:]

    def init(self) -> bytes:
        self.send(1, struct.pack(">I", 3))
        kind, body = self.recv()
        assert kind == 2
        return body

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closed the channel (EOF) within ``timeout``."""
        self.chan.settimeout(timeout)
        try:
            while True:
                if not self.chan.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.transport.close()


def s(b: bytes) -> bytes:
    """An SFTP string."""
    return struct.pack(">I", len(b)) + b
