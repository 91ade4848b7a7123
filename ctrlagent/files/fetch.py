"""
Downloading mods from the Internet without reaching anything internal (SSRF).

``SafeFetcher`` speaks HTTP through a twisted ``Agent`` whose endpoint factory
resolves the host itself, checks **every** resolved address against an
``AddressPolicy`` and then connects to that very address (so a DNS answer
cannot change between the check and the connect).  Redirects are followed by
the fetcher, not by the agent, a bounded number of times, each hop's scheme
and addresses checked again.  The body is streamed to a sink with
back-pressure, counted against a size cap, under an overall timeout.

Only well-formed ``http`` and ``https`` URLs are accepted (``urls.check_url``,
on the first URL and on every redirect).  The default policy refuses
loopback, private, link-local, shared (CGNAT), multicast, reserved and
unspecified addresses, and IPv4-mapped/6to4/Teredo forms of them: only
globally routable unicast addresses pass.  Tests inject a policy that also
allows one loopback address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.errors import CtrlAgentError, InsufficientResources, InvalidInput, PermissionDenied
from ctrlagent.files.urls import check_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
Sink = Callable[[bytes], Awaitable[None]]

_REDIRECTS = (301, 302, 303, 307, 308)


def public_only(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The default policy: globally routable unicast addresses only."""
    if isinstance(addr, ipaddress.IPv6Address):
        # Embedded IPv4 forms are judged by the address they really reach.
        for inner in (addr.ipv4_mapped, addr.sixtofour,
                      addr.teredo[1] if addr.teredo else None):
            if inner is not None and not public_only(inner):
                return False
    return bool(addr.is_global and not addr.is_multicast and not addr.is_reserved
                and not addr.is_unspecified and not addr.is_loopback
                and not addr.is_link_local and not addr.is_private)


def allow_also(*extra: str) -> AddressPolicy:
    """A policy that allows ``extra`` addresses as well (tests' loopback servers)."""
    allowed = {ipaddress.ip_address(a) for a in extra}

    def policy(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return addr in allowed or public_only(addr)

    return policy


class DownloadError(CtrlAgentError):
    """A mod download failed (HTTP status, connection, timeout)."""


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolves, checks every address, connects to the checked address."""

    def __init__(self, fetcher: SafeFetcher, host: str, port: int, tls: bool) -> None:
        self.fetcher = fetcher
        self.host = host
        self.port = port
        self.tls = tls

    @async_to_deferred
    async def connect(self, factory: Any) -> Any:
        """Resolve, refuse any internal address, connect to the first one."""
        addresses = await self.fetcher.resolve(self.host, self.port)
        if not addresses:
            raise DownloadError("{} has no address".format(self.host))
        for addr in addresses:
            if not self.fetcher.policy(addr):
                raise PermissionDenied(
                    "refusing to download from {} ({} is an internal address)".format(
                        self.host, addr))
        addr = addresses[0]
        endpoint: IStreamClientEndpoint
        if isinstance(addr, ipaddress.IPv6Address):
            endpoint = TCP6ClientEndpoint(self.fetcher.reactor, str(addr), self.port, timeout=30)
        else:
            endpoint = TCP4ClientEndpoint(self.fetcher.reactor, str(addr), self.port, timeout=30)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return await endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, fetcher: SafeFetcher) -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802 (Twisted hook)
        host = uri.host.decode("ascii").strip("[]")
        return _CheckedEndpoint(self.fetcher, host, uri.port, uri.scheme == b"https")


class _BodyReader(Protocol):
    """Streams a response body to the sink, pausing the transport while it writes."""

    def __init__(self, sink: Sink, max_bytes: int) -> None:
        self.sink = sink
        self.max_bytes = max_bytes
        # Cancelling (the fetch timeout) drops the connection.
        self.done: Deferred[int] = Deferred(self._cancel)
        self.received = 0
        self.busy = False
        self.finished = False
        self.failed = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        if self.failed:
            return
        self.received += len(data)
        if self.received > self.max_bytes:
            self._fail(InsufficientResources(
                "download is larger than the {} byte cap".format(self.max_bytes)))
            return
        self.busy = True
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._write(data)

    @async_to_deferred
    async def _write(self, data: bytes) -> None:
        # A sink error fails the download (``done``), not this Deferred.
        try:
            await self.sink(data)
        except Exception as e:
            self.busy = False
            self._fail(e)
            return
        self.busy = False
        if self.failed:
            return
        if self.finished:
            self._succeed()
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _succeed(self) -> None:
        if not self.done.called:
            self.done.callback(self.received)

    def _cancel(self, d: Deferred[int]) -> None:
        self.failed = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _fail(self, e: BaseException) -> None:
        self.failed = True
        self.transport.stopProducing()  # type: ignore[union-attr]
        if not self.done.called:
            self.done.errback(Failure(e))

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]  # noqa: N802
        if self.failed or self.done.called:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self.failed = True
            self.done.errback(Failure(DownloadError("download interrupted: {}".format(
                reason.getErrorMessage()))))
            return
        self.finished = True
        if not self.busy:
            self._succeed()


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]  # noqa: N802
        pass


class SafeFetcher:
    """
    Fetches one URL into a sink: http(s) only, public addresses only (per
    ``policy``), at most ``max_redirects`` redirects.
    """

    log = Logger()

    def __init__(self, reactor: Any, threadpool: ThreadPool | None = None,
                 policy: AddressPolicy = public_only, max_redirects: int = 5,
                 user_agent: str = "ctrlagent") -> None:
        self.reactor = reactor
        self.threadpool = threadpool or reactor.getThreadPool()
        self.policy = policy
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        # No persistent connections: each download stands alone and leaves
        # nothing open behind it.
        self.agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(self), pool=HTTPConnectionPool(reactor, persistent=False))

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address ``host`` resolves to (getaddrinfo, in the thread pool)."""
        try:
            infos = await deferToThreadPool(self.reactor, self.threadpool, socket.getaddrinfo,
                                            host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise DownloadError("cannot resolve {}: {}".format(host, e)) from None
        out = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                out.append(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
        return out

    def fetch(self, url: str, sink: Sink, max_bytes: int, timeout: float) -> Deferred[int]:
        """Download ``url`` into ``sink``; fires with the byte count."""
        d = self._fetch(url, sink, max_bytes)

        def timed_out(result: object, after: float) -> Failure:
            # Whatever the cancellation surfaced as (CancelledError,
            # ResponseNeverReceived, ...), the cause is our timeout.
            return Failure(DownloadError("download timed out after {} s".format(after)))

        d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d

    @async_to_deferred
    async def _fetch(self, url: str, sink: Sink, max_bytes: int) -> int:
        for _ in range(self.max_redirects + 1):
            # Every hop is checked in full (urls.check_url) before it reaches
            # the HTTP stack, the IDNA codec or the resolver: a malformed URL
            # is a refusal naming the field, not a traceback.
            check_url(url, field="downloadUrl")
            host = urlsplit(url).hostname
            headers = Headers({b"User-Agent": [self.user_agent.encode()]})
            try:
                response: IResponse = await self.agent.request(b"GET", url.encode("ascii"),
                                                               headers)
            except (ConnectError, DNSLookupError) as e:
                raise DownloadError("cannot connect for {}: {}".format(host, e)) from None
            if response.code in _REDIRECTS:
                location = response.headers.getRawHeaders(b"location")
                response.deliverBody(_Discard())
                if not location:
                    raise DownloadError("redirect without a Location")
                try:
                    url = urljoin(url, location[0].decode("latin-1"))
                except ValueError:
                    raise InvalidInput("downloadUrl redirects to a malformed URL",
                                       field="downloadUrl") from None
                continue
            if response.code != 200:
                response.deliverBody(_Discard())
                raise DownloadError("download failed: HTTP {}".format(response.code))
            if response.length is not None and isinstance(response.length, int) \
                    and response.length > max_bytes:
                response.deliverBody(_Discard())
                raise InsufficientResources(
                    "download is {} bytes, more than the {} byte cap".format(
                        response.length, max_bytes))
            reader = _BodyReader(sink, max_bytes)
            response.deliverBody(reader)
            return await reader.done
        raise DownloadError("too many redirects")
