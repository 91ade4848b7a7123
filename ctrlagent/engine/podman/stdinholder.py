"""
The stdin holder: one small process per Podman container run that keeps the
run's stdin attach open for as long as the container runs.

Conmon closes a container's stdin when any attach connection ends, so the
attach that carries console input must outlive the agent, as conmon
outlives podman.  ``PodmanEngine`` starts one holder per container run
(``StdinHolders``); the holder detaches itself (``setsid`` and a second
fork: its own session and process group, not the agent's child, so neither
a SIGKILL of the agent nor a Ctrl-C in its terminal reaches it), opens the
attach (``stdin=1&stderr=1``) on the Podman socket and listens on a Unix
socket (mode 0600, in the agent's state directory, named by the engine
after the container id and the run's start).  Every agent connected there
sends frames (a 4-byte big-endian length and at most ``MAX_FRAME`` bytes),
each written to the attach whole, so concurrent commands never interleave.

It ends when the attach stream ends (the container exited or was removed)
or on SIGTERM, and removes its socket and pid file.  Memory is bounded: at
most ``MAX_CLIENTS`` connections, each buffering at most one frame.

Standard library only, run by file path with the agent's interpreter in
isolated mode (``python -I -S stdinholder.py ENGINE_SOCKET ATTACH_PATH
SOCKET PIDFILE``): it prints ``ready <pid>`` (the holder's pid, also in
PIDFILE) or ``error <message>`` on stdout and its first process exits.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import sys

__all__ = ["MAX_FRAME", "MAX_CLIENTS", "frame", "FrameReader", "main"]

MAX_FRAME = 64 * 1024
MAX_CLIENTS = 16
_HEADER_CAP = 64 * 1024
_ATTACH_TIMEOUT = 15.0
# A write to the attach that cannot finish in this time (the game does not
# read its stdin) drops the connection that sent it, not the attach.
_SEND_TIMEOUT = 30.0
_LENGTH = struct.Struct(">I")


def frame(data: bytes) -> bytes:
    """``data`` (at most ``MAX_FRAME`` bytes) as one frame."""
    if len(data) > MAX_FRAME:
        raise ValueError("a frame holds at most {} bytes".format(MAX_FRAME))
    return _LENGTH.pack(len(data)) + data


class FrameReader:
    """The frames in a byte stream, buffering at most one frame."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The whole frames completed by ``data``; ValueError on a frame too long."""
        self._buffer += data
        out = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ValueError("frame of {} bytes".format(size))
            if len(self._buffer) < _LENGTH.size + size:
                break
            out.append(self._buffer[_LENGTH.size:_LENGTH.size + size])
            self._buffer = self._buffer[_LENGTH.size + size:]
        return out


def _attach(engine_socket: str, attach_path: str) -> socket.socket:
    """The upgraded attach connection (OSError or ValueError on failure)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(_ATTACH_TIMEOUT)
    conn.connect(engine_socket)
    conn.sendall((
        "POST {} HTTP/1.1\r\nHost: docker\r\nUser-Agent: ctrlagent-stdin-holder\r\n"
        "Content-Type: text/plain\r\nContent-Length: 0\r\n"
        "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
    ).format(attach_path).encode("ascii"))
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            raise ValueError("the engine closed the attach")
        head += data
        if len(head) > _HEADER_CAP:
            raise ValueError("attach: response headers too long")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] not in ("101", "200"):
        body = head.split(b"\r\n\r\n", 1)[1][:300].decode("utf-8", "replace")
        raise ValueError("attach refused: {} {}".format(status_line[:80], body.strip()))
    conn.settimeout(_SEND_TIMEOUT)
    return conn


class _Holder:
    """The holder's loop: the attach, the listening socket and its connections."""

    def __init__(self, attach: socket.socket, listener: socket.socket, path: str,
                 pidfile: str) -> None:
        self.attach = attach
        self.listener = listener
        self.path = path
        self.pidfile = pidfile
        self.inode = os.stat(path).st_ino
        self.clients: dict[socket.socket, FrameReader] = {}
        self.selector = selectors.DefaultSelector()
        self.running = True

    def run(self) -> None:
        self.selector.register(self.attach, selectors.EVENT_READ)
        self.selector.register(self.listener, selectors.EVENT_READ)
        while self.running:
            try:
                ready = self.selector.select(timeout=5.0)
            except InterruptedError:
                continue
            for key, _ in ready:
                sock = key.fileobj
                if sock is self.attach:
                    self._attach_readable()
                elif sock is self.listener:
                    self._accept()
                else:
                    assert isinstance(sock, socket.socket)
                    self._client_readable(sock)
                if not self.running:
                    break

    def _attach_readable(self) -> None:
        # What the container writes to stderr is not asked for: dropped.
        try:
            data = self.attach.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.running = False  # the run ended (exited or removed)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn] = FrameReader()
        self.selector.register(conn, selectors.EVENT_READ)

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        del self.clients[conn]
        conn.close()

    def _client_readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        try:
            frames = self.clients[conn].feed(data)
        except ValueError:
            self._drop(conn)
            return
        for payload in frames:
            try:
                self.attach.sendall(payload)
            except TimeoutError:
                self._drop(conn)
                return
            except OSError:
                self.running = False
                return

    def stop(self, *_: object) -> None:
        """SIGTERM: end now (``select`` would otherwise resume its wait)."""
        raise SystemExit(0)

    def cleanup(self) -> None:
        """Remove the socket and pid file, when they are still this holder's."""
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        try:
            with open(self.pidfile) as f:
                mine = f.read(32).strip() == str(os.getpid())
            if mine:
                os.unlink(self.pidfile)
        except OSError:
            pass


def _write_pidfile(pidfile: str, pid: int) -> None:
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("{}\n".format(pid))
    os.replace(tmp, pidfile)


def _to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def main(argv: list[str]) -> int:
    """Attach, listen, detach, then hold (see the module docstring)."""
    if len(argv) != 4:
        print("error usage: stdinholder.py ENGINE_SOCKET ATTACH_PATH SOCKET PIDFILE")
        return 2
    engine_socket, attach_path, path, pidfile = argv
    os.setsid()
    os.umask(0o077)
    try:
        # The socket first: a second holder started for the same run (two
        # agents at once) stops here, before an attach of its own whose end
        # would close the run's stdin.  Bound by its name from within its
        # directory: an address holds 107 bytes, a directory's path may not.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.chdir(os.path.dirname(path))
        listener.bind(os.path.basename(path))
        listener.listen(MAX_CLIENTS)
    except OSError as e:
        print("error {}".format(str(e)[:500]), flush=True)
        return 1
    try:
        attach = _attach(engine_socket, attach_path)
    except (OSError, ValueError) as e:
        os.unlink(os.path.basename(path))
        print("error {}".format(str(e)[:500]), flush=True)
        return 1
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        try:
            _write_pidfile(pidfile, pid)
        except OSError as e:
            os.kill(pid, signal.SIGTERM)
            print("error pid file: {}".format(e), flush=True)
            return 1
        print("ready {}".format(pid), flush=True)
        return 0
    _to_devnull()
    holder = _Holder(attach, listener, path, pidfile)
    signal.signal(signal.SIGTERM, holder.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        holder.run()
    except SystemExit:
        pass
    finally:
        holder.cleanup()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
