"""
Streamed engine responses read without Twisted's HTTP client.

A followed console is one long response per server, and an idle server's
line arrives as one small HTTP chunk.  Through ``twisted.web``'s client each
such chunk went through its response parser, its chunked decoder (a state
machine called per field), the body's proxy and a ``callLater`` that gathered
the reactor turn's chunks: at hundreds of servers that was about a fifth of
the agent's idle CPU.  Here one connection per stream sends its one request
and reads the answer itself: the status line and headers once, then every
read's chunks decoded in one pass and handed on as one piece, in the turn
they were read in.

``open_stream`` returns a ``StreamResponse`` shaped like the part of
``twisted.web.iweb.IResponse`` the client uses (``code``, ``phrase``,
``headers``, ``deliverBody``), so an error answer is read and reported as any
other.  Its body protocol sees the same ends as under ``twisted.web``: a
finished body ends with ``ResponseDone`` (``PotentialDataLoss`` when the
engine marks its end by closing, as ``attach`` does); a body cut short, a
malformed head or a broken chunk ends with ``ResponseFailed``.

Only what the engine's streams use is understood: no request body, no
``Upgrade``, no ``1xx`` but the informational ones that are skipped, and one
response per connection (the connection is closed after it).

Given a ``ReadPacer`` (``pacing``), a body is read by it rather than by the
reactor once the head is in: the streams of hundreds of servers are then
read together, in one wake.  The body's consumer pauses, resumes and closes
the connection through the response's transport, which knows who reads it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from ctrlagent.engine.connecting import connect_protocol
from ctrlagent.engine.docker.pacing import PacedConnection, ReadPacer

__all__ = ["HEAD_CAP", "StreamResponse", "open_stream", "request_bytes"]

# The status line and headers of one answer, at most (the engine's are < 1 KiB).
HEAD_CAP = 64 * 1024
# A chunk-size line, extensions included, at most.
_SIZE_LINE_CAP = 1024
# Body bytes kept for a consumer that has not come yet, before reading pauses.
_EARLY_CAP = 1024 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


class StreamResponse:
    """The head of a streamed answer; its body goes to one ``deliverBody`` protocol."""

    # The body's pieces are whole reads, already joined: a consumer need not
    # gather the reactor turn's pieces itself.
    whole_reads = True

    def __init__(self, reader: _StreamReader, code: int, phrase: bytes, headers: Headers,
                 length: int | None) -> None:
        self._reader = reader
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 (IResponse's name)
        """Hand the body, as it comes, to ``protocol``; its end to ``connectionLost``."""
        self._reader.deliver(protocol)


class _BodyTransport:
    """
    The transport a body's consumer is given: pausing, resuming and closing
    go through the reader (to its pacer, when one reads the connection);
    anything else is the connection's own.
    """

    def __init__(self, reader: _StreamReader) -> None:
        self._reader = reader

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._reader.pause_reading()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._reader.resume_reading()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._reader.close(abort=False)

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self._reader.close(abort=False)

    def abortConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self._reader.close(abort=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader.transport, name)


class _StreamReader(Protocol):
    """One request, its answer's head, then its body to the consumer."""

    def __init__(self, request: bytes, pacer: ReadPacer | None = None) -> None:
        self._request = request
        self._pacer = pacer
        self._paced: PacedConnection | None = None
        self.head: Deferred[StreamResponse] = Deferred(self._cancel)
        self._buffer = b""
        self._in_body = False
        self._chunked = False
        self._left: int | None = None  # body bytes still due (Content-Length or chunk)
        self._crlf = False  # a chunk's data ended: its CRLF is due next
        self._trailers = False  # after the last chunk: trailer lines until an empty one
        self._ended = False  # the body is complete
        self._consumer: Any = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._end: Failure | None = None  # how the body ended, before a consumer came
        self._paused = False

    # -- the connection ------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802 (Twisted hook)
        assert self.transport is not None
        self.transport.write(self._request)

    def _cancel(self, _: Deferred[StreamResponse]) -> None:
        self.close(abort=True)

    # -- reading, paced or not ---------------------------------------------------

    def pause_reading(self) -> None:
        if self._paced is not None:
            self._paced.pause()
        elif self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self._paced is not None:
            self._paced.resume()
        elif self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _unpace(self) -> None:
        """The pacer reads this connection no more (before it closes)."""
        paced, self._paced = self._paced, None
        if paced is not None:
            paced.release()

    def close(self, abort: bool) -> None:
        """Close the connection (at once when ``abort``, else after what is being written)."""
        self._unpace()
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abortConnection()  # type: ignore[attr-defined]
        else:
            transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        if self._ended:
            return
        if not self._in_body:
            self._buffer += data
            if not self._read_head():
                return
            data, self._buffer = self._buffer, b""
            if not data:
                return
        try:
            body = self._decode(data) if self._chunked else self._plain(data)
        except ValueError as e:
            self._fail(ResponseFailed([Failure(e)]))
            return
        if body:
            self._hand(body)
        if self._ended:
            self._finish(Failure(ResponseDone()))
            self.close(abort=False)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]  # noqa: N802
        self._unpace()
        if reason is None:
            reason = Failure(ConnectionDone())
        if not self.head.called:
            self.head.errback(ResponseNeverReceived([reason]))
            return
        if self._ended:
            return
        self._ended = True
        if not self._chunked and self._left is None:
            # The body ends with the connection (no length, not chunked).
            self._finish(Failure(PotentialDataLoss()))
        else:
            self._finish(Failure(ResponseFailed([reason])))

    # -- the head --------------------------------------------------------------

    def _read_head(self) -> bool:
        """True once a final head is read (the body's first bytes left in the buffer)."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > HEAD_CAP:
                    self._fail_head("response head longer than {} bytes".format(HEAD_CAP))
                return False
            if end > HEAD_CAP:
                self._fail_head("response head longer than {} bytes".format(HEAD_CAP))
                return False
            head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
            try:
                code, phrase, headers = _parse_head(head)
            except ValueError as e:
                self._fail_head(str(e))
                return False
            if 100 <= code < 200:
                continue  # informational: the real answer follows
            break
        encodings = [v.strip().lower() for raw in headers.getRawHeaders(b"transfer-encoding", [])
                     for v in raw.split(b",") if v.strip()]
        length: int | None = None
        if encodings:
            if encodings != [b"chunked"]:
                self._fail_head("unsupported transfer encoding {!r}".format(b", ".join(encodings)))
                return False
            self._chunked = True
        else:
            lengths = headers.getRawHeaders(b"content-length")
            if lengths:
                if len(set(lengths)) != 1 or not lengths[0].isdigit():
                    self._fail_head("bad Content-Length {!r}".format(lengths))
                    return False
                length = self._left = int(lengths[0])
            elif code in (204, 304):
                length = self._left = 0
            if length == 0:
                self._ended = True
        self._in_body = True
        if code == 200 and length is None and not self._ended and self._pacer is not None \
                and self.transport is not None:
            # An open-ended body (a console, the events) may last for days:
            # read it with the other streams' from the next read on (before
            # the head goes out: its consumer may pause or close at once).
            # An error's or a sized answer's is short: the reactor's.
            self._paced = self._pacer.adopt(self.transport, self)
        self.head.callback(StreamResponse(self, code, phrase, headers, length))
        if self._ended:
            self._finish(Failure(ResponseDone()))
            self.close(abort=False)
        return not self._ended

    def _fail_head(self, why: str) -> None:
        self._ended = True
        if not self.head.called:
            self.head.errback(ResponseNeverReceived([Failure(ValueError(why))]))
        self.close(abort=True)

    # -- the body ----------------------------------------------------------------

    def _plain(self, data: bytes) -> bytes:
        left = self._left
        if left is None:
            return data
        if len(data) >= left:
            self._left = 0
            self._ended = True
            return data[:left]  # anything after the body is not ours
        self._left = left - len(data)
        return data

    def _decode(self, data: bytes) -> bytes:
        """The chunk data of ``data`` (with what an earlier read left), in one piece."""
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        while pos < end:
            left = self._left
            if left:
                take = min(left, end - pos)
                # (the whole read when it is one chunk's data: no copy)
                out.append(buf if take == end and not pos else buf[pos:pos + take])
                pos += take
                left -= take
                self._left = left
                if left:
                    break
                self._crlf = True
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > _SIZE_LINE_CAP:
                    raise ValueError("chunk size line longer than {} bytes".format(_SIZE_LINE_CAP))
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self._trailers:
                if not line:
                    self._ended = True
                    return b"".join(out)
                continue
            size = line.split(b";", 1)[0].strip()
            if not size or len(size) > 16 or not _HEX.issuperset(size):
                raise ValueError("bad chunk size {!r}".format(line[:40]))
            n = int(size, 16)
            if n == 0:
                self._trailers = True
            else:
                self._left = n
        if pos < end:
            self._buffer = buf[pos:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    # -- the consumer ------------------------------------------------------------

    def deliver(self, protocol: Any) -> None:
        if self._consumer is not None:
            raise RuntimeError("the body of a response is delivered once")
        self._consumer = protocol
        protocol.makeConnection(_BodyTransport(self))
        early, self._early = self._early, []
        self._early_size = 0
        if self._paused and not self._ended:
            # Before the held body goes out: a pause the consumer makes
            # while taking it is its own, and stays.
            self._paused = False
            self.resume_reading()
        if early:
            protocol.dataReceived(b"".join(early))
        if self._end is not None:
            end, self._end = self._end, None
            protocol.connectionLost(end)

    def _hand(self, body: bytes) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.dataReceived(body)
            return
        self._early.append(body)
        self._early_size += len(body)
        if self._early_size > _EARLY_CAP and not self._paused:
            self._paused = True
            self.pause_reading()

    def _finish(self, reason: Failure) -> None:
        self._ended = True
        consumer = self._consumer
        if consumer is None:
            self._end = reason
            return
        consumer.connectionLost(reason)

    def _fail(self, error: Exception) -> None:
        self._finish(Failure(error))
        self.close(abort=True)


def _parse_head(head: bytes) -> tuple[int, bytes, Headers]:
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or len(status[1]) != 3 \
            or not status[1].isdigit():
        raise ValueError("bad status line {!r}".format(lines[0][:80]))
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise ValueError("bad header line {!r}".format(line[:80]))
        headers.addRawHeader(name, value.strip())
    return int(status[1]), status[2] if len(status) > 2 else b"", headers


def request_bytes(method: str, target: str, host: str) -> bytes:
    """
    A request with no body: ``target`` is the path and query, already
    percent-encoded, ``host`` the ``Host`` header's value.
    """
    for part in (method, target, host):
        if not part or not part.isascii() or not part.isprintable() or " " in part:
            raise ValueError("cannot send {!r} in a request head".format(part))
    return (
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ctrlagent\r\n\r\n".format(method, target, host)
    ).encode("ascii")


def open_stream(endpoint: IStreamClientEndpoint, request: bytes,
                pacer: ReadPacer | None = None) -> Deferred[StreamResponse]:
    """
    Connect, send ``request`` and fire with the answer's head (its body still
    to come through ``deliverBody``, read by ``pacer`` when given).
    Cancelling closes the connection.
    """
    reader = _StreamReader(request, pacer)
    connecting = connect_protocol(endpoint, reader)
    result: Deferred[StreamResponse] = Deferred(lambda _: connecting.cancel()
                                                if not connecting.called else reader.head.cancel())

    def connected(_: Any) -> None:
        reader.head.chainDeferred(result)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) and result.called:
            return
        result.errback(failure)

    connecting.addCallbacks(connected, failed)
    return result
