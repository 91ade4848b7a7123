"""
The HTTP listener: a ``Site`` that an unauthenticated client cannot exhaust.

Twisted buffers a whole request body (to a temporary file past 100 kB) before
any resource sees it, and keeps a connection that sends its headers slowly for
as long as each byte comes within the idle timeout.  Checks in the resource
come too late, so this module guards the HTTP layer itself:

- **Credentials before the body.**  ``GuardedRequest.gotLength`` runs once all
  headers are in and before any body byte is buffered.  A request that
  announces a body (a length or chunked) without the node's secret is answered
  401 there, its connection stops reading and is closed: the body is never
  read, let alone stored.  Until a request of a connection has shown the
  secret, the connection reads in small slices (``HEADER_READ_BYTES``), so
  even the bytes that arrive with the headers stay a few KiB.
- **Size before the body.**  An authenticated request whose declared length is
  over ``max_body_bytes`` is answered 413 at once; a chunked one is counted as
  it arrives and refused past the limit.  The rest of the upload is drained
  (not kept) for a bounded time so the client can read the 413.
- **Header time.**  A request's line and headers must arrive within
  ``header_timeout`` seconds of its first byte (of the connection, for the
  first request), however the client trickles them; then it is answered 408
  and closed.
- **Connection count.**  At most ``max_connections`` connections are open.  A
  new one past that evicts the oldest connection that is not doing anything
  for an authenticated client (a slow or idle unauthenticated one); when every
  open connection is busy, the new one is closed at once.  A slowloris can
  therefore never starve ``/health`` or the Panel: its own connections are
  the first to go.

The refusals are written straight to the transport because such a request
never reaches a resource.  ``make_http_service`` binds the site to whatever
``serverFromString`` description the configuration names (``tcp:8081``,
``ssl:8443:certKey=..``, ``unix:/run/x``), and a port it cannot bind is raised
from ``privilegedStartService`` so that the agent exits instead of running
without its API.

**The plain command.**  Nearly every request a node gets is the Panel's
``POST /api/command``, and Twisted's parser, ``Request`` and header objects
cost more CPU than the command itself.  When a connection is idle and one
``dataReceived`` holds such a request whole and plain (see
``plain_command``), the channel hands its credentials and body to the site's
``plain_command`` handler (``AgentApi.answer_plain_command``) without making
a ``Request``.  The handler either answers at once (a status or metrics read:
the channel writes the whole response in one write, with the very headers
Twisted would), or declines before doing anything (Twisted then answers the
same bytes as usual), or has started a command that is not answered at once:
the bytes then go through Twisted's parser all the same, and the request it
makes carries the started command (``GuardedRequest.handover``) so that it is
never dispatched twice.  Every guard above holds on this path too: the
secret is checked first, the body is within ``max_body_bytes`` and already
read, the header deadline and idle timeout are reset as for any request.
The judgement of a head is remembered (``_plain_head``): the Panel sends
the same head every time.

**Sending the answers.**  A plain answer waits until the reactor turn that
made it has read every connection that was ready, and the answers of the
turn are then handed to the kernel together (``GuardedSite.send_soon``, a
call at the start of the next turn; ``write_now``).  Twisted's own write
would queue each until the reactor finds its socket writable: two
``epoll_ctl`` calls and one more event per answer, a tenth of a read's CPU,
and the answers would go out interleaved with the next turn's reads.
Whatever the kernel does not take, or a failed send, goes to Twisted's
write (its order, flow control and errors), and bytes Twisted reads after a
plain answer on the same connection are read only once that answer is sent.
(The reactor's clock is the wall clock: answers waiting for that call when
the clock is stepped back are sent with the next answer made, not when the
clock catches up.)  Sending each answer in the very turn it is made was
tried twice and not kept: with 16 clients it woke the client once per answer, saving 2-3 % of
the CPU per read at best, and the 16-client p99 got worse.
"""

from __future__ import annotations

import functools
import io
import re
import resource as rlimit
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote_to_bytes

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ctrlagent.config import AgentConfig
from ctrlagent.errors import ParseError
from ctrlagent.startup import StartupError, listen_failure, os_error_text
from ctrlagent.wire import http as envelopes
from ctrlagent.wire.json import encode

# Read size of a connection until one of its requests has shown the secret.
HEADER_READ_BYTES = 4096
# Descriptors kept for everything but API connections (Docker streams, the
# store, files being served), when the process limit is lower than wanted.
_RESERVED_DESCRIPTORS = 256


# The one request line the plain-command path reads; anything else is Twisted's.
_COMMAND_LINE = b"POST /api/command HTTP/1.1\r\n"
# A plain command's head is small (the Panel sends about 300 bytes); a larger
# one, or one with many lines, goes to Twisted, whose own limits then apply.
_PLAIN_HEAD_BYTES = 8192
_PLAIN_HEADER_LINES = 64
# Header lines whose names are RFC 9110 tokens (what Twisted's ``_istoken``
# accepts) and whose values hold no CR, LF or NUL: no obs-fold, no bare line
# ends, no space before the colon.
_PLAIN_HEAD = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*\r\n)*"
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*"
)
# Headers that change how a request is read or answered: Twisted's business.
_NOT_PLAIN = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
# Longer Content-Length digits are refused by every limit long before.
_LENGTH_DIGITS = 12
# Parsed heads kept (``_plain_head``): a few per client, at most 8 KiB each.
_PLAIN_HEADS_KEPT = 64


# The start of a plain command's answer, as Twisted writes its status line and
# Server header (read once: ``twisted.web.server`` is a deprecation proxy
# whose every attribute read costs).
_PLAIN_OK = b"HTTP/1.1 200 OK\r\nServer: " + server.version + b"\r\nDate: "
_http_date = http.datetimeToString


class _DateHeader:
    """The value of the Date header now, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._value = second, _http_date(second)
        return self._value


_date_header = _DateHeader()


# The state of Twisted's HTTP parser that says whether it is between requests
# (private to Twisted: a release without it leaves the plain path off).
_PARSER_STATE = (
    "_HTTPChannel__first_line",
    "_HTTPChannel__header",
    "_buffer",
    "_busyReceiving",
    "_waitingForTransport",
    "line_mode",
    "persistent",
)
PLAIN_PATH_FITS = all(hasattr(http.HTTPChannel, name) for name in _PARSER_STATE)


class PlainCommand(NamedTuple):
    """A whole, plain ``POST /api/command`` at the start of some received bytes."""

    #: The last ``Authorization`` value, stripped as Twisted strips it (None: absent).
    authorization: bytes | None
    #: The ``X-API-Key`` value (None: absent).
    api_key: bytes | None
    body: bytes
    #: Where the request ends in the bytes (the next request starts there).
    end: int


def plain_command(data: bytes, max_body_bytes: int) -> PlainCommand | None:
    """
    The ``POST /api/command`` that ``data`` starts with, when it is there
    whole and plain; else None (Twisted's parser then reads ``data``).

    Plain means: exactly that request line; at most a few KiB of well-formed
    header lines (token names, no obs-fold, no bare CR or LF, no NUL), each
    name at most once; no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``;
    ``Connection`` absent or ``keep-alive``; a ``Host`` that is UTF-8; one
    decimal ``Content-Length`` from 1 to ``max_body_bytes``, and that many
    body bytes present.  Whatever Twisted would answer 400, 408 or 413, or
    read differently, is therefore never plain.
    """
    if not data.startswith(_COMMAND_LINE):
        return None
    start = len(_COMMAND_LINE)
    head_end = data.find(b"\r\n\r\n", start - 2, start + _PLAIN_HEAD_BYTES)
    if head_end < start:
        # No header at all (the blank line right after the request line), or
        # not all of them yet.
        return None
    fields = _plain_head(data[start:head_end])
    if fields is None:
        return None
    authorization, api_key, size = fields
    body_start = head_end + 4
    end = body_start + size
    if not 0 < size <= max_body_bytes or len(data) < end:
        return None
    return PlainCommand(authorization, api_key, data[body_start:end], end)


@functools.lru_cache(maxsize=_PLAIN_HEADS_KEPT)
def _plain_head(head: bytes) -> tuple[bytes | None, bytes | None, int] | None:
    """
    ``(authorization, api_key, content_length)`` of a plain command's header
    lines (``plain_command`` says what plain means), or None.

    A pure function of the bytes, kept for the last few heads seen: the
    Panel sends the same head again and again (only its Content-Length
    follows the body), so most requests skip the parse.
    """
    if _PLAIN_HEAD.fullmatch(head) is None:
        return None
    lines = head.split(b"\r\n")
    if len(lines) > _PLAIN_HEADER_LINES:
        return None
    fields: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key in fields or key in _NOT_PLAIN:
            return None
        fields[key] = value.strip(b" \t")
    connection = fields.get(b"connection")
    if connection is not None and connection.lower() != b"keep-alive":
        return None
    host = fields.get(b"host")
    if host is not None:
        try:
            host.decode("utf-8")
        except UnicodeDecodeError:
            return None
    length = fields.get(b"content-length")
    if length is None or not length.isdigit() or len(length) > _LENGTH_DIGITS:
        return None
    return fields.get(b"authorization"), fields.get(b"x-api-key"), int(length)


class Handover(Protocol):
    """
    A command the plain-command handler started but could not answer at
    once.  The request Twisted makes of the same bytes carries it
    (``GuardedRequest.handover``); whoever answers that request sets
    ``claimed``.
    """

    claimed: bool

    def unclaimed(self) -> None:
        """No request took it (a bug): keep the command tracked and say so."""


# ``(authorization, api_key, body)`` -> the response after its Date line
# (headers, blank line, body) of a 200 answered at once; a ``Handover``; or
# None: nothing was done, Twisted answers the request.
PlainCommandHandler = Callable[[bytes | None, bytes | None, bytes], "bytes | Handover | None"]


def _parse_error(message: str) -> bytes:
    """The JSON body of a request refused before any route (the Panel's failure shape)."""
    return encode(envelopes.failure(ParseError(message)))


def too_large_body(limit: int) -> bytes:
    """The JSON body of a 413 answer (the Panel's failure shape)."""
    return encode(envelopes.too_large(limit))


def _raw_response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )


def _unauthorized_response() -> bytes:
    return _raw_response(
        b"401 Unauthorized",
        encode(envelopes.auth_failed()),
        b'WWW-Authenticate: Bearer realm="ctrlagent"\r\n',
    )


def _timeout_response() -> bytes:
    return _raw_response(
        b"408 Request Timeout",
        _parse_error("the request's headers did not arrive in time"),
    )


class GuardedRequest(server.Request):
    """
    A request checked at its headers: a body needs the node's secret, and may
    not be larger than the site's ``max_body_bytes``.
    """

    log = Logger()

    _limit: int | None = None
    _received = 0
    _refused = False
    #: The command the channel already started for this request (see the module).
    handover: Handover | None = None

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        if isinstance(channel, GuardedChannel):
            self.handover = channel.take_handover()

    def _site(self) -> GuardedSite | None:
        site = getattr(self.channel, "site", None)
        return site if isinstance(site, GuardedSite) else None

    def gotLength(self, length: int | None) -> None:
        """
        Headers are in, no body byte is stored yet: refuse a body that has no
        credential or that is declared over the limit.
        """
        site = self._site()
        channel = self.channel
        if isinstance(channel, GuardedChannel):
            channel.headers_complete()
        if site is not None:
            authorized = site.authorized(self)
            if authorized and isinstance(channel, GuardedChannel):
                channel.authenticated()
            if not authorized and length != 0:
                # Nothing of the body will be kept: no temp file for it either.
                self.content = io.BytesIO()
                self._refuse_unauthenticated()
                return
            self._limit = site.max_body_bytes
        if self._limit is not None and length is not None and length > self._limit:
            self.content = io.BytesIO()
            self._refuse_too_large(declared=length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count chunked (or lying) bodies as they arrive; refuse past the limit."""
        if self._refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self.content = io.BytesIO()
            self._refuse_too_large(declared=None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """A refused request is never processed, even if its body completes."""
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def render(self, resrc: IResource) -> None:
        """
        Refuse a URL or Host that is not UTF-8 with the API's JSON 400 (Klein
        would log a traceback and answer plain text).
        """
        host = self.getHeader(b"host") or b""
        try:
            unquote_to_bytes(self.path).decode("utf-8")
            host.decode("utf-8")
        except UnicodeDecodeError:
            body = _parse_error("the URL or Host header is not valid UTF-8")
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Content-Length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return
        super().render(resrc)

    def _refuse_unauthenticated(self) -> None:
        """
        Answer 401 and close without reading the body.

        Reading stops at once (the kernel's small receive window holds what
        the client already sent); the write side is closed after the answer so
        that a client reading while it uploads sees the 401, and the connection
        is aborted after ``refused_grace`` seconds whatever the client does.
        """
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        transport = channel.transport
        site = self._site()
        assert site is not None
        if isinstance(channel, GuardedChannel):
            channel.refused_unauthenticated += 1
            channel.closing()
        # Debug: an unauthenticated client must not be able to flood the log.
        self.log.debug(
            "refused a request body without credentials from {peer}",
            peer=str(self.getClientAddress()),
        )
        if transport is None:
            return
        channel.setTimeout(None)
        channel.dataReceived = lambda data: None  # type: ignore[method-assign]
        _stop_reading(transport)
        transport.write(_unauthorized_response())
        half_close = getattr(transport, "loseWriteConnection", None)
        if callable(half_close):
            half_close()
        else:
            transport.loseConnection()
        if site.refused_grace <= 0:
            _abort(transport)
            return
        _abort_after(channel, site.clock, site.refused_grace)

    def _refuse_too_large(self, declared: int | None) -> None:
        self._refused = True
        channel = self.channel
        transport = channel.transport
        limit = self._limit or 0
        self.log.warn(  # noqa: G010 - twisted.logger's method
            "refusing request body of {size} bytes (limit {limit}) from {peer}",
            size=declared if declared is not None else "more than {}".format(limit),
            limit=limit,
            peer=str(self.getClientAddress()),
        )
        # No "100 Continue" after this: a client that waits for it never sends the body.
        self.requestHeaders.removeHeader(b"expect")
        if transport is None:
            return
        transport.write(_raw_response(b"413 Payload Too Large", too_large_body(limit)))
        channel.setTimeout(None)
        site = self._site()
        clock = site.clock if site is not None else None
        if site is None or clock is None:
            channel.dataReceived = lambda data: None  # type: ignore[method-assign]
            transport.loseConnection()
            return
        # Swallow whatever the client still sends instead of closing at once:
        # closing a socket with unread data makes the kernel send a reset, and
        # a client still busy uploading would lose the 413 it has not read
        # yet.  Close once the client has been quiet for ``refused_grace``
        # seconds, and in any case after ``refused_drain_max``.  (Only a
        # client that showed the secret gets here.)
        grace = site.refused_grace
        idle: IDelayedCall = clock.callLater(grace, transport.loseConnection)
        cap: IDelayedCall = clock.callLater(site.refused_drain_max, transport.loseConnection)

        def swallow(data: bytes) -> None:
            if idle.active():
                idle.reset(grace)

        channel.dataReceived = swallow  # type: ignore[method-assign]
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            for call in (idle, cap):
                if call.active():
                    call.cancel()
            lost(reason)

        channel.connectionLost = connection_lost  # type: ignore[method-assign]


# The name the rest of the code (and older tests) know it by.
LimitedRequest = GuardedRequest
_site_log = Logger(namespace="ctrlagent.api.site.GuardedSite")


def write_now(transport: Any, data: bytes) -> None:
    """
    ``transport.write(data)``, but handed to the kernel at once when the
    transport is a plain TCP connection with nothing queued.  What the kernel
    does not take now (or a failed send) goes to ``transport.write``, which
    keeps the order, the flow control and the error handling Twisted's.
    """
    if type(transport) is tcp.Server and _nothing_queued(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        data = data[sent:]
    if data:
        transport.write(data)


def _nothing_queued(transport: tcp.Server) -> bool:
    """Whether a plain, open TCP transport holds no unsent bytes (Twisted's buffers)."""
    try:
        return bool(
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
        )
    except AttributeError:
        # Another Twisted's transport: its own write only.
        return False


def _abort(transport: Any) -> None:
    """Close now, dropping unsent data (``loseConnection`` where there is no abort)."""
    abort = getattr(transport, "abortConnection", None)
    (abort if callable(abort) else transport.loseConnection)()


def _stop_reading(transport: Any) -> None:
    producer = IPushProducer(transport, None)
    if producer is not None:
        producer.pauseProducing()


def _abort_after(channel: Any, clock: IReactorTime, delay: float) -> None:
    """Abort ``channel``'s transport after ``delay`` s unless it is lost first."""
    transport = channel.transport
    call = clock.callLater(delay, _abort, transport)
    lost = channel.connectionLost

    def connection_lost(reason: Any) -> None:
        if call.active():
            call.cancel()
        lost(reason)

    channel.connectionLost = connection_lost


class GuardedChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection that the site counts, reads in small slices until
    it shows the secret, and closes when its headers come too slowly.
    """

    log = Logger()

    site: GuardedSite
    #: Bytes this connection has read from its socket (for tests and stats).
    bytes_read = 0
    #: Unauthenticated bodies this connection was refused.
    refused_unauthenticated = 0
    _is_authenticated = False
    _awaiting_headers = True
    _header_call: IDelayedCall | None = None
    _closing = False
    _handover: Handover | None = None
    # Plain answers made in this reactor turn, not sent yet (send_unsent).
    _unsent: list[bytes] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        if transport is not None and isinstance(getattr(transport, "bufferSize", None), int):
            transport.bufferSize = HEADER_READ_BYTES  # type: ignore[attr-defined]
        self._arm_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        self.bytes_read += len(data)
        handler = getattr(self.site, "plain_command", None)
        if handler is not None and PLAIN_PATH_FITS:
            data = self._answer_plain(handler, data)
            if not data:
                return
        if self._awaiting_headers and self._header_call is None:
            # The first byte of the next request on a kept-alive connection.
            self._arm_header_deadline()
        if self._unsent:
            # Twisted may answer these bytes at once: after the plain answers.
            self.send_unsent()
        handover = self._handover
        super().dataReceived(data)
        if handover is not None:
            self._handover = None
            if not handover.claimed:
                handover.unclaimed()

    def _idle(self) -> bool:
        """
        Whether Twisted's parser is between requests with nothing buffered and
        nothing in flight, so that the next bytes start a request.
        """
        return (
            not self.requests
            and not getattr(self, "_handlingRequest", True)
            and self.line_mode == 1
            and not self._buffer
            and not self._busyReceiving
            and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
            and not self._HTTPChannel__header  # type: ignore[attr-defined]
            and getattr(self, "_transferDecoder", True) is None
            and bool(self.persistent)
            and not self._waitingForTransport
            and not self._closing
            and self.transport is not None
            and not getattr(self.transport, "disconnecting", False)
        )

    def _answer_plain(self, handler: PlainCommandHandler, data: bytes) -> bytes:
        """
        Answer the plain commands ``data`` starts with (see the module);
        return the bytes left for Twisted's parser.  On a handover the
        command's bytes are left too, for the request that takes it.
        """
        while data and self._idle():
            command = plain_command(data, self.site.max_body_bytes)
            if command is None:
                break
            outcome = handler(command.authorization, command.api_key, command.body)
            if outcome is None:
                break
            if not isinstance(outcome, bytes):
                self._handover = outcome
                break
            self._answered_plain(outcome)
            data = data[command.end :]
        return data

    def _answered_plain(self, response: bytes) -> None:
        """Write a plain command's 200 and do what ending a request does."""
        # What HTTPChannel.dataReceived and a request's end would do: restart
        # the idle timeout; the headers came in time; the connection showed
        # the secret; the next request's first byte arms a new deadline.
        self.resetTimeout()
        self.headers_complete()
        self.authenticated()
        self._awaiting_headers = True
        self.site.plain_answers += 1
        transport = self.transport
        assert transport is not None
        answer = _PLAIN_OK + _date_header() + b"\r\n" + response
        if type(transport) is not tcp.Server:
            transport.write(answer)
        elif self._unsent is None:
            self._unsent = [answer]
            self.site.send_soon(self)
        else:
            self._unsent.append(answer)

    def send_unsent(self) -> None:
        """Send the plain answers made since the last send (see ``GuardedSite.send_soon``)."""
        unsent, self._unsent = self._unsent, None
        transport = self.transport
        if unsent and transport is not None:
            write_now(transport, unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def take_handover(self) -> Handover | None:
        """The command started for the request being made now (once)."""
        handover, self._handover = self._handover, None
        return handover

    def headers_complete(self) -> None:
        """The current request's headers are in (called from ``gotLength``)."""
        self._awaiting_headers = False
        call, self._header_call = self._header_call, None
        if call is not None and call.active():
            call.cancel()

    def authenticated(self) -> None:
        """A request on this connection carried the node's secret."""
        if self._is_authenticated:
            return
        self._is_authenticated = True
        transport = self.transport
        if transport is not None and isinstance(getattr(transport, "bufferSize", None), int):
            transport.bufferSize = 2**16  # type: ignore[attr-defined]

    @property
    def evictable(self) -> bool:
        """Nothing of an authenticated client's is on this connection right now."""
        return not self._is_authenticated and (self._awaiting_headers or self._closing)

    def requestDone(self, request: Any) -> None:
        # Before the parent replays pipelined data, which may complete the
        # next request's headers at once.
        if self.persistent:
            self._awaiting_headers = True
        super().requestDone(request)

    def closing(self) -> None:
        """This connection is on its way out: a new one may take its slot."""
        self._closing = True

    def evict(self) -> None:
        """Make room for a new connection: drop this one now."""
        self._closing = True
        transport = self.transport
        if transport is not None:
            _abort(transport)

    def _arm_header_deadline(self) -> None:
        timeout = self.site.header_timeout if isinstance(self.site, GuardedSite) else 0
        if timeout and timeout > 0:
            self._header_call = self.site.clock.callLater(timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_call = None
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        self.log.debug(
            "closing {peer}: its request headers did not arrive within {timeout} s",
            peer=str(transport.getPeer()),
            timeout=self.site.header_timeout,
        )
        self.setTimeout(None)
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        _stop_reading(transport)
        transport.write(_timeout_response())
        self.loseConnection()
        # A client that does not read its answer must not hold the slot either.
        _abort_after(self, self.site.clock, 1.0)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        call, self._header_call = self._header_call, None
        if call is not None and call.active():
            call.cancel()
        self._unsent = None
        site = getattr(self, "site", None)
        if isinstance(site, GuardedSite):
            site.channel_closed(self)
        super().connectionLost(reason)


class GuardedSite(server.Site):
    """
    A ``Site`` whose connections are counted and guarded (see the module
    docstring); ``authorize(request)`` says whether a request carries the
    node's secret (None: every request does, for tests of other behaviour).
    ``plain_command`` answers plain commands without a ``Request`` (see the
    module; None: Twisted reads every request).
    """

    requestFactory = GuardedRequest
    protocol = GuardedChannel  # type: ignore[assignment]
    # Access lines for every Panel poll would drown the log; errors still show.
    noisy = False

    def __init__(
        self,
        resource: IResource,
        *,
        max_body_bytes: int,
        clock: IReactorTime,
        authorize: Callable[[IRequest], bool] | None = None,
        plain_command: PlainCommandHandler | None = None,
        max_connections: int = 1024,
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        refused_grace: float = 2.0,
        refused_drain_max: float = 30.0,
        **kwargs: Any,
    ) -> None:
        # The API reads JSON bodies only.  Twisted would otherwise parse every
        # POST's Content-Type with the email package (a sixth of a command's
        # CPU) and load form bodies into ``request.args`` (a second copy of an
        # upload in memory), or drop the connection over a form it cannot parse.
        super().__init__(
            resource,
            reactor=clock,
            parsePOSTFormSubmission=False,
            timeout=idle_timeout,
            **kwargs,
        )
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self._authorize = authorize
        # Answers plain ``POST /api/command`` requests without a Request (None: none is).
        self.plain_command = plain_command
        self.plain_answers = 0
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        # A refused upload is drained until the client is quiet this long...
        self.refused_grace = refused_grace
        # ...but never longer than this.
        self.refused_drain_max = refused_drain_max
        # Open connections, oldest first (dicts keep insertion order).
        self._channels: dict[GuardedChannel, None] = {}
        self.evicted = 0
        self.refused_connections = 0
        self._last_full_warning = -1e9
        # Channels with plain answers to send when this reactor turn ends.
        self._unsent: list[GuardedChannel] = []
        self._send_call: IDelayedCall | None = None

    def send_soon(self, channel: GuardedChannel) -> None:
        """
        Send ``channel``'s plain answers once this reactor turn has read
        every connection that was ready (a call at the start of the next).
        """
        self._unsent.append(channel)
        call = self._send_call
        if call is None:
            self._send_call = self.clock.callLater(0, self._send_unsent)
        elif call.getTime() > self.clock.seconds() + 1.0:
            # The reactor's clock is the wall clock: stepped back since the
            # call was made, the call would wait that long.  Send now.
            call.cancel()
            self._send_unsent()

    def _send_unsent(self) -> None:
        self._send_call = None
        channels, self._unsent = self._unsent, []
        for channel in channels:
            try:
                channel.send_unsent()
            except Exception:
                _site_log.failure("could not send a plain answer")

    def authorized(self, request: IRequest) -> bool:
        """Whether ``request`` carries the node's secret."""
        return True if self._authorize is None else bool(self._authorize(request))

    @property
    def open_connections(self) -> int:
        """How many connections are open right now."""
        return len(self._channels)

    def channels(self) -> list[GuardedChannel]:
        """The open connections, oldest first."""
        return list(self._channels)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A guarded channel, after making room for it (or None: closed at once)."""
        if len(self._channels) >= self.max_connections and not self._make_room():
            self.refused_connections += 1
            self._warn_full(addr)
            return None
        channel = super().buildProtocol(addr)
        if isinstance(channel, GuardedChannel):
            self._channels[channel] = None
        return channel

    def channel_closed(self, channel: GuardedChannel) -> None:
        """Forget a connection that is gone."""
        self._channels.pop(channel, None)

    def _make_room(self) -> bool:
        for channel in self._channels:
            if channel.evictable:
                # Forget it now: its connectionLost comes on a later turn.
                del self._channels[channel]
                channel.evict()
                self.evicted += 1
                return True
        return False

    def _warn_full(self, addr: IAddress | None) -> None:
        now = self.clock.seconds()
        if now - self._last_full_warning < 10.0:
            return
        self._last_full_warning = now
        _site_log.warn(  # noqa: G010 - twisted.logger's method
            "refusing a connection from {peer}: {count} connections are open and busy"
            " (http.max_connections)",
            peer=str(addr),
            count=len(self._channels),
        )

    def log(self, request: Any) -> None:  # type: ignore[override]
        """No access log: the Panel polls every few seconds."""


# The name the rest of the code (and older tests) know it by.
LimitedSite = GuardedSite


def descriptor_budget(wanted_connections: int) -> int:
    """
    Raise this process's open-file limit to its hard limit (as Go and nginx
    do: the soft limit of 1,024 many systems still default to is far below
    what a node serving many clients and game servers needs) and return how
    many API connections fit, keeping descriptors for everything else.
    """
    try:
        soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
        if hard == rlimit.RLIM_INFINITY:
            target = max(soft, wanted_connections + 4 * _RESERVED_DESCRIPTORS)
        else:
            target = hard
        if soft != rlimit.RLIM_INFINITY and target > soft:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError):
        return wanted_connections
    if soft == rlimit.RLIM_INFINITY:
        return wanted_connections
    return max(16, min(wanted_connections, soft - _RESERVED_DESCRIPTORS))


class HttpService(StreamServerEndpointService):
    """
    The listening API.  A port that cannot be bound raises from
    ``privilegedStartService`` (the agent then exits with one line).  Stopping
    it stops accepting connections, then waits (at most ``drain_timeout``
    seconds) for commands already running, so that a shutdown does not cut a
    create or a file write in half.
    """

    log = Logger()
    # Raise a bind failure to whoever starts the service, instead of logging
    # it and running on without an API.
    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: Any,
        site: GuardedSite,
        api: Any,
        drain_timeout: float,
        description: str = "its endpoint",
    ) -> None:
        super().__init__(endpoint, site)
        self._api = api
        self._drain_timeout = drain_timeout
        self.site = site
        self.description = description

    def privilegedStartService(self) -> None:
        wanted = self.site.max_connections
        fits = descriptor_budget(wanted)
        if fits < wanted:
            self.log.warn(  # noqa: G010 - twisted.logger's method
                "the open-file limit allows {fits} API connections, not {wanted}"
                " (http.max_connections); raise LimitNOFILE",
                fits=fits,
                wanted=wanted,
            )
            self.site.max_connections = fits
        try:
            super().privilegedStartService()
        except Exception as e:
            raise listen_failure(self.description, e) from None

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()  # type: ignore[assignment]
        drain = getattr(self._api, "drain", None)
        if drain is None:
            return stopped
        return stopped.addCallback(lambda _: drain(self._drain_timeout))


def make_http_service(
    reactor: Any, config: AgentConfig, api: Any, drain_timeout: float = 10.0
) -> StreamServerEndpointService:
    """
    The HTTP API as a service listening where ``config.http`` says.

    ``api`` is an ``AgentApi`` (anything with a Klein ``app``; its
    ``resource()``, when it has one, is served instead of the app's, its
    ``authorized(request)`` gates request bodies, and its
    ``answer_plain_command`` answers plain commands: see the module).
    """
    description = config.http.endpoint_description()
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:
        # A TLS certificate that cannot be read, an unknown endpoint type...
        why = os_error_text(e) if isinstance(e, OSError) else str(e) or type(e).__name__
        raise StartupError(
            "the HTTP API endpoint {} cannot be set up ({})".format(description, why)
        ) from None
    authorize = getattr(api, "authorized", None)
    answer_plain = getattr(api, "answer_plain_command", None)
    http_config = config.http
    resource = getattr(api, "resource", None)
    site = GuardedSite(
        resource() if callable(resource) else api.app.resource(),
        max_body_bytes=http_config.max_body_bytes,
        clock=reactor,
        authorize=authorize if callable(authorize) else None,
        plain_command=answer_plain if callable(answer_plain) else None,
        max_connections=http_config.max_connections,
        header_timeout=http_config.header_timeout,
        idle_timeout=http_config.idle_timeout,
    )
    service = HttpService(endpoint, site, api, drain_timeout, description)
    service.setName("http")
    return service
