"""
The listener against clients that try to exhaust the node without the secret.

Unit tests drive ``GuardedSite`` channels over ``StringTransport`` with a
``Clock``; the rest use a real listening socket on 127.0.0.1:

- a body without the secret is answered 401 at its headers and never read
  (20 clients each announcing 24 MiB: a few KiB read per connection, no
  temporary file);
- request headers must arrive within ``header_timeout`` however they trickle;
- connections are bounded; past the bound the oldest slow/idle
  unauthenticated one makes room, never the Panel's, so that ``/health``
  answers within a second under a thousand slow connections.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import Agent, HTTPConnectionPool

from ctrlagent.api import GuardedChannel, GuardedSite
from ctrlagent.api.site import HEADER_READ_BYTES
from tests.api.conftest import SECRET, ApiRig, panel_headers

LIMIT = 64 * 1024
BIG = 24 * 1024 * 1024
PING = json.dumps({"action": "system.ping"}).encode()


def _site(rig: ApiRig, clock: Any, **kwargs: Any) -> GuardedSite:
    return GuardedSite(
        rig.api.app.resource(),
        max_body_bytes=kwargs.pop("max_body_bytes", LIMIT),
        clock=clock,
        authorize=rig.api.authorized,
        **kwargs,
    )


def _connect(site: GuardedSite, port: int = 40000) -> tuple[GuardedChannel, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    assert isinstance(channel, GuardedChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = ["{} {} HTTP/1.1".format(method, path), "Host: node.test"]
    lines += ["{}: {}".format(k, v) for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.fixture
def temp_files(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every temporary file created while the test runs (Twisted's body buffer)."""
    made: list[object] = []
    original = tempfile.TemporaryFile

    def counting(*args: Any, **kwargs: Any) -> Any:
        f = original(*args, **kwargs)
        made.append(f)
        return f

    monkeypatch.setattr(tempfile, "TemporaryFile", counting)
    return made


# -- credentials before the body (unit) --------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        {"Content-Length": str(BIG)},
        {"Transfer-Encoding": "chunked"},
        {"Content-Length": str(BIG), "Expect": "100-continue"},
        {"Content-Length": "10", "Authorization": "Bearer wrong"},
        {"Content-Length": "10", "X-API-Key": SECRET + "x"},
    ],
    ids=["declared", "chunked", "expect-continue", "wrong-bearer", "wrong-api-key"],
)
def test_a_body_without_the_secret_is_refused_at_the_headers(
    framing: dict[str, str], temp_files: list[object]
) -> None:
    rig = ApiRig()
    clock = Clock()
    site = _site(rig, clock, refused_grace=2.0)
    channel, transport = _connect(site)
    channel.dataReceived(_request("POST", "/api/command", framing))
    answer = transport.value()
    assert _status(answer) == 401
    assert b"100 Continue" not in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "AUTH_FAILED"
    # Reading stopped at once; whatever still arrives is not processed.
    assert transport.producerState == "paused"
    channel.dataReceived(b"x" * 100_000)
    assert transport.value() == answer
    assert rig.dispatcher is not None and temp_files == []
    assert channel.refused_unauthenticated == 1
    # ...and the connection is aborted after the grace period at the latest.
    assert not transport.disconnected
    clock.advance(2.0)
    assert transport.disconnected


def test_a_body_with_the_secret_is_read_and_served() -> None:
    rig = ApiRig()
    site = _site(rig, Clock())
    channel, transport = _connect(site)
    headers = {**panel_headers(), "Content-Length": str(len(PING))}
    channel.dataReceived(_request("POST", "/api/command", headers, PING))
    assert _status(transport.value()) == 200
    assert b'"pong"' in transport.value()


def test_requests_without_a_body_reach_the_api_unauthenticated() -> None:
    rig = ApiRig()
    site = _site(rig, Clock())
    channel, transport = _connect(site)
    channel.dataReceived(_request("GET", "/health", {}))
    assert _status(transport.value()) == 200
    transport.clear()
    # An authenticated route without a body is the API's own 401, kept alive.
    channel.dataReceived(_request("GET", "/api/status", {}))
    assert _status(transport.value()) == 401
    assert not transport.disconnecting


def test_an_oversized_body_with_the_secret_is_still_413() -> None:
    rig = ApiRig()
    site = _site(rig, Clock())
    channel, transport = _connect(site)
    headers = {**panel_headers(), "Content-Length": str(BIG)}
    channel.dataReceived(_request("POST", "/api/command", headers))
    assert _status(transport.value()) == 413


def test_a_url_that_is_not_utf8_is_a_json_400() -> None:
    rig = ApiRig()
    site = _site(rig, Clock())
    for path in ("/api/servers/%ED%A0%80", "/api/servers/%FF/power"):
        channel, transport = _connect(site)
        channel.dataReceived(_request("GET", path, panel_headers()))
        answer = transport.value()
        assert _status(answer) == 400
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "PARSE_ERROR"


# -- header time (unit) ---------------------------------------------------------------


def test_headers_trickled_past_the_timeout_are_cut_off() -> None:
    rig = ApiRig()
    clock = Clock()
    site = _site(rig, clock, header_timeout=10.0)
    channel, transport = _connect(site)
    request = _request("GET", "/health", {"X-Pad": "y" * 40})
    for byte in request[:30]:  # one byte a second: never idle, never done
        channel.dataReceived(bytes([byte]))
        clock.advance(1.0)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert _status(transport.value()) == 408
    assert site.open_connections == 1  # until the transport reports the loss
    clock.advance(1.0)
    assert transport.disconnected  # aborted: a client that does not read holds nothing


def test_a_silent_new_connection_is_closed_after_the_header_timeout() -> None:
    site = _site(ApiRig(), clock := Clock(), header_timeout=10.0)
    _, transport = _connect(site)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_a_kept_alive_connection_gets_a_fresh_header_deadline_per_request() -> None:
    rig = ApiRig()
    clock = Clock()
    site = _site(rig, clock, header_timeout=10.0, idle_timeout=60.0)
    channel, transport = _connect(site)
    channel.dataReceived(_request("GET", "/health", {}))
    assert _status(transport.value()) == 200
    # Idle between requests: the idle timeout applies, not the header one.
    clock.advance(30.0)
    assert not transport.disconnecting
    transport.clear()
    channel.dataReceived(_request("GET", "/health", {}))
    assert _status(transport.value()) == 200
    clock.advance(61.0)
    assert transport.disconnecting


def test_pipelined_requests_each_get_their_own_header_deadline() -> None:
    rig = ApiRig()
    clock = Clock()
    site = _site(rig, clock, header_timeout=10.0)
    channel, transport = _connect(site)

    def command(action: str, **payload: Any) -> bytes:
        body = json.dumps({"action": action, "serverId": "srv", "payload": payload}).encode()
        headers = {**panel_headers(), "Content-Length": str(len(body))}
        return _request("POST", "/api/command", headers, body)

    created = rig.servers.hold("create")
    # The second request arrives, complete, while the first is still running.
    channel.dataReceived(command("create_server", image="img") + command("start_server"))
    started = rig.servers.hold("start")
    created.callback(None)
    # The second runs now; a third arrives meanwhile and waits its turn.
    channel.dataReceived(_request("GET", "/health", {}))
    clock.advance(30.0)
    assert not transport.disconnecting
    started.callback(None)
    assert transport.value().count(b"HTTP/1.1 200") == 3, transport.value()
    clock.advance(11.0)
    assert not transport.disconnecting  # idle between requests: not a header timeout


# -- connection bound (unit) ----------------------------------------------------------


def test_past_the_bound_the_oldest_slow_connection_makes_room() -> None:
    rig = ApiRig()
    clock = Clock()
    site = _site(rig, clock, max_connections=16)
    panel, panel_transport = _connect(site, 1)
    headers = {**panel_headers(), "Content-Length": str(len(PING))}
    panel.dataReceived(_request("POST", "/api/command", headers, PING))
    assert _status(panel_transport.value()) == 200
    slow = [_connect(site, 100 + i) for i in range(15)]
    for channel, _ in slow:
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    assert site.open_connections == 16
    newcomer, newcomer_transport = _connect(site, 999)
    assert site.open_connections == 16
    assert site.evicted == 1
    # The oldest slow connection went, not the Panel's (older still).
    assert slow[0][1].disconnecting and slow[0][1].disconnected
    assert not panel_transport.disconnecting
    newcomer.dataReceived(_request("GET", "/health", {}))
    assert _status(newcomer_transport.value()) == 200


def test_when_every_connection_is_busy_a_new_one_is_closed_at_once() -> None:
    rig = ApiRig()
    site = _site(rig, Clock(), max_connections=16)
    busy = []
    for i in range(16):
        # The Panel, halfway through uploading a body.
        channel, transport = _connect(site, i)
        headers = {**panel_headers(), "Content-Length": "1000"}
        channel.dataReceived(_request("POST", "/api/command", headers, b"{" * 10))
        busy.append(transport)
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000)) is None
    assert site.refused_connections == 1
    assert not any(t.disconnecting for t in busy)


# -- real sockets ----------------------------------------------------------------------


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


async def _listen(site: GuardedSite) -> tuple[IListeningPort, int]:
    port: IListeningPort = await serverFromString(
        reactor, "tcp:0:interface=127.0.0.1:backlog=1024"
    ).listen(site)
    return port, port.getHost().port  # type: ignore[attr-defined]


@pytest_twisted.async_yield_fixture
async def real_site() -> AsyncIterator[Callable[..., Any]]:
    ports: list[IListeningPort] = []
    sites: list[GuardedSite] = []

    async def start(**kwargs: Any) -> tuple[GuardedSite, int]:
        rig = ApiRig()
        rig.api._clock = reactor  # type: ignore[assignment]
        site = _site(rig, reactor, **kwargs)
        port, number = await _listen(site)
        ports.append(port)
        sites.append(site)
        return site, number

    yield start
    for port in ports:
        await port.stopListening()
    for site in sites:
        for channel in site.channels():
            if channel.transport is not None:
                channel.transport.abortConnection()
    await _sleep(0.05)


class _Uploader:
    """A blocking-free client that announces a body and pushes as much as the kernel takes."""

    def __init__(self, port: int, headers: dict[str, str], total: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.sent = 0
        self.total = total
        self.received = b""
        self.closed = False
        head = _request("POST", "/api/command", {**headers, "Content-Length": str(total)})
        self.pending = head
        self.chunk = b"A" * 65536

    def pump(self) -> None:
        while not self.closed:
            data = self.pending or (self.chunk if self.sent < self.total else b"")
            if not data:
                break
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if self.pending:
                self.pending = self.pending[n:]
            else:
                self.sent += n
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.closed = True
                    break
                self.received += data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed = True

    def close(self) -> None:
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_twenty_unauthenticated_24_mib_uploads_are_never_read(
    real_site: Callable[..., Any], temp_files: list[object]
) -> None:
    site, port = await real_site(max_body_bytes=BIG + 1, refused_grace=1.0)
    clients = [_Uploader(port, {"Content-Type": "application/json"}, BIG) for _ in range(20)]
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(c.received for c in clients):
            for c in clients:
                c.pump()
            await _sleep(0.01)
        assert all(_status(c.received) == 401 for c in clients)
        read = [ch.bytes_read for ch in site.channels()]
        # Headers plus at most one small read slice each: nothing of 24 MiB.
        assert read and max(read) <= HEADER_READ_BYTES * 2
        assert temp_files == []
        # Each connection is closed within the grace period.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and site.open_connections:
            for c in clients:
                c.pump()
            await _sleep(0.05)
        assert site.open_connections == 0
    finally:
        for c in clients:
            c.close()


@pytest_twisted.ensureDeferred
async def test_an_authenticated_upload_is_still_served_at_full_speed(
    real_site: Callable[..., Any],
) -> None:
    _, port = await real_site(max_body_bytes=BIG + 1)
    body = json.dumps({"action": "system.ping", "payload": {"pad": "p" * (8 * 1024 * 1024)}})
    response = await treq.post(
        "http://127.0.0.1:{}/api/command".format(port),
        data=body.encode(),
        headers=panel_headers(),
    )
    assert response.code == 200
    assert (await response.json())["data"]["message"] == "pong"


def _slow_clients(port: int, count: int) -> Iterator[socket.socket]:
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        s.send(b"GET /health HTTP/1.1\r\nHost: slow\r\n")  # never finished
        yield s


async def _timed_health(port: int) -> float:
    started = time.monotonic()
    response = await treq.get("http://127.0.0.1:{}/health".format(port), timeout=5)
    assert response.code == 200
    assert (await response.json())["nodeId"] == "node-test"
    return time.monotonic() - started


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_health_answers_within_a_second_under_a_thousand_slow_connections(
    real_site: Callable[..., Any],
) -> None:
    site, port = await real_site(header_timeout=30.0)
    slow: list[socket.socket] = []
    try:
        for s in _slow_clients(port, 1000):
            slow.append(s)
            if len(slow) % 100 == 0:
                await _sleep(0)  # let the reactor accept
        deadline = time.monotonic() + 10
        while site.open_connections < 1000 and time.monotonic() < deadline:
            await _sleep(0.05)
        assert site.open_connections >= 1000
        for _ in range(5):
            assert await _timed_health(port) < 1.0
    finally:
        for s in slow:
            s.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_slow_connections_past_the_bound_make_room_for_health_and_the_panel(
    real_site: Callable[..., Any],
) -> None:
    site, port = await real_site(max_connections=64, header_timeout=30.0)
    # The Panel's kept-alive, authenticated connection predates the flood.
    pool = HTTPConnectionPool(reactor, persistent=True)
    panel = treq.client.HTTPClient(Agent(reactor, pool=pool))
    url = "http://127.0.0.1:{}/api/command".format(port)
    response = await panel.post(url, data=PING, headers=panel_headers())
    assert response.code == 200
    await response.content()
    slow: list[socket.socket] = []
    try:
        for s in _slow_clients(port, 300):
            slow.append(s)
            if len(slow) % 50 == 0:
                await _sleep(0.01)
        await _sleep(0.3)
        assert site.open_connections <= 64
        assert site.evicted >= 300 - 64
        assert await _timed_health(port) < 1.0
        response = await panel.post(url, data=PING, headers=panel_headers())
        assert response.code == 200
        assert (await response.json())["data"]["message"] == "pong"
    finally:
        for s in slow:
            s.close()
        await pool.closeCachedConnections()


def test_the_open_file_limit_is_raised_and_bounds_the_connections() -> None:
    import resource

    from ctrlagent.api.site import descriptor_budget

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        fits = descriptor_budget(1024)
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == hard
        assert fits == min(1024, hard - 256)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
