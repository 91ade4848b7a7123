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
"""

from __future__ import annotations

import io
import resource as rlimit
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.application.internet import StreamServerEndpointService
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

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        if transport is not None and isinstance(getattr(transport, "bufferSize", None), int):
            transport.bufferSize = HEADER_READ_BYTES  # type: ignore[attr-defined]
        self._arm_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        self.bytes_read += len(data)
        if self._awaiting_headers and self._header_call is None:
            # The first byte of the next request on a kept-alive connection.
            self._arm_header_deadline()
        super().dataReceived(data)

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
        site = getattr(self, "site", None)
        if isinstance(site, GuardedSite):
            site.channel_closed(self)
        super().connectionLost(reason)


class GuardedSite(server.Site):
    """
    A ``Site`` whose connections are counted and guarded (see the module
    docstring); ``authorize(request)`` says whether a request carries the
    node's secret (None: every request does, for tests of other behaviour).
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
    ``resource()``, when it has one, is served instead of the app's, and its
    ``authorized(request)`` gates request bodies).
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
    http_config = config.http
    resource = getattr(api, "resource", None)
    site = GuardedSite(
        resource() if callable(resource) else api.app.resource(),
        max_body_bytes=http_config.max_body_bytes,
        clock=reactor,
        authorize=authorize if callable(authorize) else None,
        max_connections=http_config.max_connections,
        header_timeout=http_config.header_timeout,
        idle_timeout=http_config.idle_timeout,
    )
    service = HttpService(endpoint, site, api, drain_timeout, description)
    service.setName("http")
    return service
