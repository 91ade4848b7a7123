"""
Console input: a raw hijacked attach to a container's stdin.

treq cannot write after its request is sent, and ``Agent`` must never see an
``Upgrade: tcp`` request, so this small protocol writes the attach request by
hand on a fresh connection to the engine (Unix socket, TCP or TLS), reads the
``101 UPGRADED`` (or ``200``) response headers, and from then on uses the
connection as a pipe to the container's stdin.  With ``OpenStdin: true,
StdinOnce: false`` the container keeps running when the pipe closes and a new
pipe can be attached later, so one pipe can live as long as the server.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ctrlagent.engine.docker.errors import DockerError, DockerUnavailable, error_for_status

__all__ = ["StdinPipe", "AttachStdinProtocol", "attach_request"]

_HEADER_CAP = 64 * 1024


def attach_request(path_and_query: str, host_header: str = "docker") -> bytes:
    """The hand-written hijacking attach request for ``path_and_query``."""
    return (
        "POST {} HTTP/1.1\r\n"
        "Host: {}\r\n"
        "User-Agent: ctrlagent\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: 0\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: tcp\r\n"
        "\r\n"
    ).format(path_and_query, host_header).encode("ascii")


class AttachStdinProtocol(Protocol):
    """
    Writes the attach request, waits for the upgrade, then is a stdin pipe.

    ``ready`` fires once the engine accepted the attach (or fails with a typed
    error); ``closed`` fires (never fails) when the connection is gone.
    """

    log = Logger()

    def __init__(self, request: bytes, error_cap: int = 64 * 1024) -> None:
        self._request = request
        self._error_cap = error_cap
        self._buffer = b""
        self._status = 0
        self._upgraded = False
        self._error_body = b""
        self.ready: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 (Twisted hook)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        if self._upgraded:
            return  # stdout/stderr were not asked for; nothing else is expected
        if self._status:
            self._error_body += data
            self._maybe_error_done()
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _HEADER_CAP:
                self._fail(DockerError(0, "attach: response headers too long"))
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        try:
            self._status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(DockerError(0, "attach: bad status line {!r}".format(status_line[:80])))
            return
        if self._status in (101, 200):
            self._upgraded = True
            self.ready.callback(None)
            return
        self._error_body = rest
        self._maybe_error_done()

    def _maybe_error_done(self, final: bool = False) -> None:
        body = self._error_body
        if not final and b"}" not in body and len(body) < self._error_cap:
            return
        message = body[: self._error_cap].decode("utf-8", "replace")
        start, stop = message.find("{"), message.rfind("}")
        if start >= 0 and stop > start:
            try:
                message = str(json.loads(message[start : stop + 1]).get("message", message))
            except ValueError:
                pass
        self._fail(error_for_status(self._status, message.strip(), "container"))

    def _fail(self, error: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(error)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if not self.ready.called:
            if self._status and self._status not in (101, 200):
                self._maybe_error_done(final=True)
            else:
                self.ready.errback(
                    DockerUnavailable("attach stdin: connection lost: {}".format(
                        reason.getErrorMessage() if reason else "closed"))
                )
        if not self.closed.called:
            self.closed.callback(None)


class StdinPipe:
    """
    A container's stdin, open until ``close()`` or until the engine drops it.

    ``write_line`` adds the newline; ``closed`` fires when the connection is
    gone (container removed, daemon stopped, or ``close()``).
    """

    def __init__(self, protocol: AttachStdinProtocol) -> None:
        self._protocol = protocol

    @property
    def closed(self) -> Deferred[None]:
        """Fires (with None, never an error) when the pipe is gone."""
        return self._protocol.closed

    @property
    def connected(self) -> bool:
        """True while bytes written can still reach the container."""
        return not self._protocol.closed.called

    def write(self, data: bytes) -> None:
        """Write raw bytes to the container's stdin."""
        if not self.connected:
            raise DockerUnavailable("console stdin is closed")
        transport: Any = self._protocol.transport
        transport.write(data)

    def write_line(self, text: str) -> None:
        """Write one console command followed by a newline."""
        line = text.rstrip("\r\n")
        try:
            # U+DC80..U+DCFF stand for raw bytes (surrogateescape), as the
            # payload check lets through; anything else unencodable is replaced.
            data = line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = line.encode("utf-8", "replace")
        self.write(data + b"\n")

    def close(self) -> Deferred[None]:
        """Close the pipe; the container keeps running. Returns ``closed``."""
        transport: Any = self._protocol.transport
        if transport is not None and self.connected:
            transport.loseConnection()
        return self.closed
