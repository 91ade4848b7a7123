"""
Console input on Podman through stdin holders (``stdinholder.py``).

Conmon closes a container's stdin when any attach ends, so ``PodmanEngine``
never gives the agent an attach of its own: ``StdinHolders`` finds (or
starts) the run's holder, a process outside the agent that keeps the one
stdin attach of the run open, and connects to its Unix socket.  A pipe is
then that connection (``HolderPipe``): closing it, or the agent dying,
leaves the attach open, and the next agent finds the holder again.

The holder's socket is ``<dir>/<first 24 hex digits of the id>-<the run's
start in ns>.sock`` (and ``.pid`` beside it): nothing of it comes from a
user.  A socket left there that nobody answers belongs to a holder that was
killed: its attach ended, so conmon has closed the run's stdin and nothing
can reopen it before the server restarts.  That is said once in the log and
by every command (``StdinClosed``), never silently dropped.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ctrlagent.engine.connecting import connect_protocol
from ctrlagent.engine.docker.errors import DockerConflict, DockerError, DockerUnavailable
from ctrlagent.engine.interface import IStdinPipe
from ctrlagent.engine.podman import stdinholder
from ctrlagent.engine.podman.stdinholder import MAX_FRAME, frame

__all__ = ["StdinHolders", "HolderPipe", "ClosedStdin", "StdinClosed", "holder_pids",
           "SOCKET_PATH_MAX"]

# sun_path holds 108 bytes with its terminating NUL.
SOCKET_PATH_MAX = 107
_FULL_ID = re.compile(r"[0-9a-f]{64}")
_OUTPUT_CAP = 4096
_CONNECT_ERRORS = (ConnectError, TimeoutError, OSError)


class StdinClosed(DockerConflict):
    """The run's console input is closed for good (its holder ended while it ran)."""


def _line_bytes(text: str) -> bytes:
    line = text.rstrip("\r\n")
    try:
        # As StdinPipe: U+DC80..U+DCFF stand for raw bytes (surrogateescape).
        data = line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = line.encode("utf-8", "replace")
    return data + b"\n"


class _HolderConnection(Protocol):
    """The agent's end of one connection to a stdin holder."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        pass  # the holder sends nothing

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if not self.closed.called:
            self.closed.callback(None)


@implementer(IStdinPipe)
class HolderPipe:
    """A connection to a stdin holder: every ``write`` reaches the container whole."""

    def __init__(self, connection: _HolderConnection) -> None:
        self._connection = connection
        # True when the open that made it started the holder: its attach was made now.
        self.attached_now = False

    @property
    def closed(self) -> Deferred[None]:
        """Fires (with None) when the connection is gone: closed, or the run ended."""
        return self._connection.closed

    @property
    def transport(self) -> Any:
        """The connection's transport (tests end it as a dying process would)."""
        return self._connection.transport

    @property
    def connected(self) -> bool:
        return self._connection.transport is not None and not self.closed.called

    def write(self, data: bytes) -> None:
        if not self.connected:
            raise DockerUnavailable("console stdin is closed")
        transport: Any = self._connection.transport
        transport.write(b"".join(frame(data[i:i + MAX_FRAME])
                                 for i in range(0, len(data), MAX_FRAME)))

    def write_line(self, text: str) -> None:
        self.write(_line_bytes(text))

    def close(self) -> Deferred[None]:
        transport: Any = self._connection.transport
        if transport is not None and self.connected:
            transport.loseConnection()
        return self.closed


@implementer(IStdinPipe)
class ClosedStdin:
    """The stdin of a run whose holder ended: every write says so."""

    connected = False

    def __init__(self, message: str) -> None:
        self.message = message

    def write(self, data: bytes) -> None:
        raise StdinClosed(self.message)

    def write_line(self, text: str) -> None:
        raise StdinClosed(self.message)

    def close(self) -> Deferred[None]:
        return succeed(None)


class _Launch(ProcessProtocol):
    """The holder's first process: its one line of output and its end."""

    def __init__(self) -> None:
        self.output = b""
        self.done: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        self.output = (self.output + data)[:_OUTPUT_CAP]

    def errReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        self.output = (self.output + data)[:_OUTPUT_CAP]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted hook)
        self.done.callback(None)


def holder_pids(directory: str) -> Iterator[int]:
    """The pids the holders' pid files in ``directory`` name (tests' teardown, diagnostics)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.endswith(".pid"):
            try:
                with open(os.path.join(directory, name)) as f:
                    text = f.read(32).strip()
            except OSError:
                continue
            if text.isdigit():
                yield int(text)


class StdinHolders:
    """
    The stdin holders of one Podman service's containers, under ``directory``.

    ``open`` connects to the run's holder, starting it when there is none;
    ``engine_socket`` is the Podman service's Unix socket.
    """

    log = Logger()

    def __init__(self, reactor: Any, directory: str, engine_socket: str, *,
                 timeout: float = 15.0, python: str = sys.executable) -> None:
        self._reactor = reactor
        self.directory = directory
        self._engine_socket = engine_socket
        self._timeout = timeout
        self._python = python
        self._told: set[str] = set()
        self._dir_fd: int | None = None
        # The holders this object started: socket path -> pid.
        self.started: dict[str, int] = {}

    def fits(self) -> bool:
        """
        True when the holders' sockets can be reached: their paths fit a Unix
        socket address, or ``/proc/self/fd`` reaches them through a
        descriptor of their directory (``_address``).
        """
        return (len(self.socket_path("0" * 64, 2**63 - 1)) <= SOCKET_PATH_MAX
                or os.path.isdir("/proc/self/fd"))

    def _address(self, path: str) -> str:
        """
        ``path`` as a Unix socket address: itself when it fits, else through
        ``/proc/self/fd/<a descriptor of its directory>`` (a state directory's
        path may be longer than the 107 bytes of an address).
        """
        if len(path) <= SOCKET_PATH_MAX:
            return path
        if self._dir_fd is not None and os.fstat(self._dir_fd).st_ino != os.stat(
                self.directory).st_ino:
            os.close(self._dir_fd)  # the directory was made again
            self._dir_fd = None
        if self._dir_fd is None:
            self._dir_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return "/proc/self/fd/{}/{}".format(self._dir_fd, os.path.basename(path))

    def socket_path(self, cid: str, started_ns: int) -> str:
        """The holder's socket of the run of ``cid`` (a full id) started at ``started_ns``."""
        if not _FULL_ID.fullmatch(cid):
            raise DockerError(0, "not a full container id: {!r}".format(cid[:80]))
        return os.path.join(self.directory, "{}-{}.sock".format(cid[:24], int(started_ns)))

    async def open(self, cid: str, started_ns: int, attach_path: str) -> IStdinPipe:
        """A pipe to the stdin of ``cid``'s current run (started at ``started_ns``)."""
        path = self.socket_path(cid, started_ns)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        except OSError as e:
            raise DockerError(0, "the stdin holders' directory {}: {}".format(
                self.directory, e.strerror)) from None
        try:
            return await self._connect(path)
        except _CONNECT_ERRORS:
            if os.path.lexists(path):
                return self._closed(cid, path)
        self._sweep(cid, keep=path)
        started = True
        try:
            await self._start(path, attach_path)
        except DockerError:
            if not os.path.lexists(path):
                raise
            # Another holder of this run took the socket first: use it.
            started = False
        try:
            pipe = await self._connect(path)
        except _CONNECT_ERRORS as e:
            # It ended at once: the run ended while it attached.
            raise DockerUnavailable("console stdin of container {}: its holder ended: {}".format(
                cid[:12], e)) from None
        pipe.attached_now = started
        return pipe

    def forget(self, cid: str) -> None:
        """Remove what holders of ``cid`` (a full id) left behind: the container is removed."""
        if _FULL_ID.fullmatch(cid):
            self._sweep(cid, keep=None)

    async def _connect(self, path: str) -> HolderPipe:
        """
        A connection to the holder at ``path``.  Cancelled (the agent stops
        while it connects), it raises ``CancelledError``: the connect is
        abandoned (no connection is left half-open) and nothing reads it as
        a holder that is gone.
        """
        endpoint = UNIXClientEndpoint(self._reactor, self._address(path),
                                      timeout=int(self._timeout))
        try:
            connection: _HolderConnection = await connect_protocol(endpoint, _HolderConnection())
        except ConnectingCancelledError:
            raise CancelledError() from None
        return HolderPipe(connection)

    def _closed(self, cid: str, path: str) -> ClosedStdin:
        message = ("console input of container {} is closed until the server restarts: "
                   "the process holding its stdin ended, and Podman closes a container's "
                   "stdin when an attach ends".format(cid[:12]))
        if path not in self._told:
            self._told.add(path)
            self.log.warn("{message}", message=message)  # noqa: G010 - twisted.logger's method
        return ClosedStdin(message)

    def _sweep(self, cid: str, keep: str | None) -> None:
        """Remove the files of ``cid``'s holders that are gone (other runs, or all)."""
        prefix = cid[:24] + "-"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if not name.startswith(prefix) or path == keep or not name.endswith(".sock"):
                continue
            if _answers(self._address(path)):
                continue  # a holder still ending with its run: it removes its own files
            for stale in (path, path[:-len(".sock")] + ".pid"):
                try:
                    os.unlink(stale)
                except OSError:
                    pass
            self._told.discard(path)

    async def _start(self, path: str, attach_path: str) -> None:
        pidfile = path[:-len(".sock")] + ".pid"
        launch = _Launch()
        args = [self._python, "-I", "-S", stdinholder.__file__,
                self._engine_socket, attach_path, path, pidfile]
        try:
            self._reactor.spawnProcess(launch, self._python, args, env={},
                                       childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            raise DockerError(0, "could not start the stdin holder: {}".format(e)) from None
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            launch.done.cancel()

        timer = self._reactor.callLater(self._timeout, time_out)
        try:
            await launch.done
        except CancelledError:
            if not timed_out:
                # The agent stops: the holder starting goes on alone (it is
                # the run's, found by the next agent, and ends with the run).
                raise
            raise DockerUnavailable("the stdin holder did not answer in {:.0f} s".format(
                self._timeout)) from None
        finally:
            if timer.active():
                timer.cancel()
        text = launch.output.decode("utf-8", "replace").strip()
        if not text.startswith("ready "):
            detail = text[len("error "):] if text.startswith("error ") else text
            raise DockerError(0, "could not hold the console stdin: {}".format(
                detail[:500] or "the holder ended without a word"))
        pid = text.split()[1]
        if pid.isdigit():
            self.started[path] = int(pid)


def _answers(path: str) -> bool:
    """True when something listens on the Unix socket ``path`` (a non-blocking connect)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            return True
        except OSError as e:
            return e.errno in (errno.EAGAIN,)
        return True
