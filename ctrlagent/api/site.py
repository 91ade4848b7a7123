"""
The HTTP listener: a ``Site`` that refuses oversized bodies before reading them.

Twisted buffers a whole request body (to a temporary file past 100 kB) before
any resource sees it, so a size check in the handler comes too late to protect
memory and disk.  ``LimitedRequest`` checks the declared ``Content-Length`` as
soon as the headers are in (``gotLength``) and counts chunked bodies as they
arrive (``handleContentChunk``); past ``max_body_bytes`` it answers 413 with
the Panel's JSON failure shape, discards the rest of the upload and closes the
connection.  The 413 is written straight to the transport because the request
will never reach a resource.

``make_http_service`` binds it to whatever ``serverFromString`` description the
configuration names (``tcp:8081``, ``ssl:8443:certKey=..``, ``unix:/run/x``).
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

from ctrlagent.config import AgentConfig


def too_large_body(limit: int) -> bytes:
    """The JSON body of a 413 answer (the Panel's failure shape)."""
    return json.dumps(
        {
            "success": False,
            "error": "request body exceeds the limit of {} bytes".format(limit),
            "code": "INVALID_PAYLOAD",
        }
    ).encode("utf-8")


class LimitedRequest(server.Request):
    """A request that refuses a body larger than its site's ``max_body_bytes``."""

    log = Logger()

    _limit: int | None = None
    _received = 0
    _refused = False

    def _site_limit(self) -> int | None:
        site = getattr(self.channel, "site", None)
        limit = getattr(site, "max_body_bytes", None)
        return limit if isinstance(limit, int) else None

    def gotLength(self, length: int | None) -> None:
        """Headers are in: refuse at once when the declared length is over the limit."""
        self._limit = self._site_limit()
        if self._limit is not None and length is not None and length > self._limit:
            # Nothing of the body will be kept: do not create a temp file for it.
            self.content = io.BytesIO()
            self._refuse(declared=length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count chunked (or lying) bodies as they arrive; refuse past the limit."""
        if self._refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self.content = io.BytesIO()
            self._refuse(declared=None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """A refused request is never processed, even if its body completes."""
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self, declared: int | None) -> None:
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
        body = too_large_body(limit)
        head = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        if transport is None:
            return
        transport.write(head + body)
        channel.setTimeout(None)
        site = getattr(channel, "site", None)
        clock = getattr(site, "clock", None)
        if clock is None:
            channel.dataReceived = lambda data: None  # type: ignore[method-assign]
            transport.loseConnection()
            return
        # Swallow whatever the client still sends instead of closing at once:
        # closing a socket with unread data makes the kernel send a reset, and
        # a client still busy uploading would lose the 413 it has not read
        # yet.  Close once the client has been quiet for ``refused_grace``
        # seconds, and in any case after ``refused_drain_max``.
        grace = float(getattr(site, "refused_grace", 2.0))
        idle: IDelayedCall = clock.callLater(grace, transport.loseConnection)
        cap: IDelayedCall = clock.callLater(
            float(getattr(site, "refused_drain_max", 30.0)), transport.loseConnection
        )

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


class LimitedSite(server.Site):
    """A ``Site`` whose requests refuse bodies over ``max_body_bytes``."""

    requestFactory = LimitedRequest
    # Access lines for every Panel poll would drown the log; errors still show.
    noisy = False

    def __init__(
        self,
        resource: IResource,
        *,
        max_body_bytes: int,
        clock: IReactorTime,
        refused_grace: float = 2.0,
        refused_drain_max: float = 30.0,
        **kwargs: Any,
    ) -> None:
        # The API reads JSON bodies only.  Twisted would otherwise parse every
        # POST's Content-Type with the email package (a sixth of a command's
        # CPU) and load form bodies into ``request.args`` (a second copy of an
        # upload in memory), or drop the connection over a form it cannot parse.
        super().__init__(resource, reactor=clock, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        # A refused upload is drained until the client is quiet this long...
        self.refused_grace = refused_grace
        # ...but never longer than this.
        self.refused_drain_max = refused_drain_max

    def log(self, request: Any) -> None:
        """No access log: the Panel polls every few seconds."""


class HttpService(StreamServerEndpointService):
    """
    The listening API.  Stopping it stops accepting connections, then waits
    (at most ``drain_timeout`` seconds) for commands already running, so that
    a shutdown does not cut a create or a file write in half.
    """

    def __init__(self, endpoint: Any, site: LimitedSite, api: Any, drain_timeout: float) -> None:
        super().__init__(endpoint, site)
        self._api = api
        self._drain_timeout = drain_timeout

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

    ``api`` is an ``AgentApi`` (anything with a Klein ``app``).
    """
    endpoint = serverFromString(reactor, config.http.endpoint_description())
    site = LimitedSite(api.app.resource(), max_body_bytes=config.http.max_body_bytes, clock=reactor)
    service = HttpService(endpoint, site, api, drain_timeout)
    service.setName("http")
    return service
