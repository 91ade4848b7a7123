"""
The host's floor for the HTTP benchmarks: the cheapest answer a Twisted
reactor can give to the benchmark's client.

A bare ``Protocol`` on Twisted's default reactor, one thread like the agent,
that answers every ``POST`` with one fixed 200 of ``BODY_BYTES`` (the first
argument; the agent's answer's size) and the agent's headers: no routing, no
credentials, no JSON, no state.  ``bench/http_latency.py`` measures it with
the same client right after the agent, in the same conditions; whatever
latency it shows is the host's (its scheduler, its other work), not the
agent's.  Prints its port, then serves until SIGTERM or its stdin closes.

    python bench/floor_server.py BODY_BYTES
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import protocol, reactor, stdio

# At most this many bytes of a request's head (the benchmark sends ~300).
_MAX_HEAD = 65536


def answer(body_bytes: int) -> bytes:
    """One whole 200: the agent's header set around a JSON body of ``body_bytes``."""
    empty = json.dumps({"success": True, "data": {"pad": ""}}, separators=(",", ":"))
    body = json.dumps(
        {"success": True, "data": {"pad": "x" * max(0, body_bytes - len(empty))}},
        separators=(",", ":"),
    ).encode()
    head = (
        "HTTP/1.1 200 OK\r\nServer: TwistedWeb\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n"
        "Access-Control-Allow-Origin: *\r\nContent-Type: application/json\r\n"
        "Cache-Control: no-store\r\nContent-Length: {}\r\n\r\n".format(len(body))
    )
    return head.encode() + body


class Floor(protocol.Protocol):
    """Answers each whole request (head and ``Content-Length`` body) at once."""

    response = b""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted hook)
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        buffer = self._buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self.transport.loseConnection()  # type: ignore[union-attr]
                    return
                break
            length = 0
            for line in buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            self.transport.write(self.response)  # type: ignore[union-attr]
        self._buffer = buffer


class _StopOnClose(protocol.Protocol):
    """Stops the reactor when the benchmark closes our stdin."""

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted hook)
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def main() -> None:
    Floor.response = answer(int(sys.argv[1]))
    factory = protocol.ServerFactory()
    factory.protocol = Floor
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write("{}\n".format(port.getHost().port))  # type: ignore[attr-defined]
    sys.stdout.flush()
    stdio.StandardIO(_StopOnClose())
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
