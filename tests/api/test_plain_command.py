"""
The listener's plain-command path (``api/site.py``): a whole, plain
``POST /api/command`` on an idle connection is answered without Twisted's
``Request``, and everything else goes to Twisted exactly as before.

The reference is the same listener with the path switched off.  Every case
sends the same bytes, through a real socket, to a fresh API behind each
listener, and both must answer byte for byte alike (the Date header aside),
dispatch the same commands the same number of times, record the same
metrics and log the same lines.  The counters of the plain listener then
show which requests took the plain path and which did not.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ctrlagent.api import GuardedChannel, GuardedSite, make_http_service
from ctrlagent.api.site import PLAIN_PATH_FITS, HttpService, plain_command, write_now
from ctrlagent.wire.command import ActionResult, Command
from tests.api.conftest import SECRET, ApiRig

LIMIT = 16 * 1024
STATUS = {"action": "get_server_status", "serverId": "s1"}
METRICS = {"action": "get_server_metrics", "serverId": "s1", "payload": {}}


def _post(
    body: bytes | dict[str, Any] | list[Any],
    *,
    secret: str | None = SECRET,
    head: str = "",
    length: int | None = None,
) -> bytes:
    """A Panel-shaped command (``head``: extra header lines, CRLF-ended)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if secret is not None:
        lines += "Authorization: Bearer {}\r\n".format(secret)
    lines += head
    lines += "Content-Length: {}\r\n\r\n".format(len(data) if length is None else length)
    return lines.encode() + data


@dataclass
class Case:
    """Bytes to send (one write per chunk), answers to wait for, plain answers expected."""

    chunks: list[bytes]
    answers: int
    plain: int
    slow: bool = False


CASES: dict[str, Case] = {
    "status": Case([_post(STATUS)], 1, 1),
    "metrics": Case([_post(METRICS)], 1, 1),
    "x-api-key": Case([_post(STATUS, secret=None, head="X-API-Key: " + SECRET + "\r\n")], 1, 1),
    "odd-spellings": Case(
        [
            b"POST /api/command HTTP/1.1\r\nhost:127.0.0.1\r\nAUTHORIZATION:   bearer  "
            + SECRET.encode()
            + b"\t \r\ncontent-LENGTH:\t"
            + str(len(json.dumps(STATUS))).encode()
            + b"  \r\nConnection: Keep-Alive\r\n\r\n"
            + json.dumps(STATUS).encode()
        ],
        1,
        1,
    ),
    "leading-zeros-length": Case([_post(STATUS).replace(b"Length: ", b"Length: 000")], 1, 1),
    "wrong-secret": Case([_post(STATUS, secret="wrong")], 1, 0),
    "no-secret": Case([_post(STATUS, secret=None)], 1, 0),
    "secret-and-wrong-key": Case([_post(STATUS, head="X-API-Key: nope\r\n")], 1, 1),
    "malformed-json": Case([_post(b"{not json")], 1, 0),
    "not-utf8": Case([_post(b'{"action": "\xff"}')], 1, 0),
    "lone-surrogate": Case(
        [_post(b'{"action": "get_server_status", "serverId": "\\ud800"}')], 1, 0
    ),
    "non-object": Case([_post([1, 2])], 1, 0),
    "no-action": Case([_post({"serverId": "s1"})], 1, 0),
    "unknown-action": Case([_post({"action": "no_such_action"})], 1, 0),
    "unknown-server": Case([_post({"action": "get_server_status", "serverId": "nope"})], 1, 0),
    "bad-payload": Case([_post({**STATUS, "payload": 3})], 1, 0),
    "large-body": Case([_post({**STATUS, "payload": {"pad": "x" * 9000}})], 1, 0),
    "over-the-limit": Case([_post({**STATUS, "payload": {"pad": "x" * (LIMIT + 10)}})], 1, 0),
    "declared-over-the-limit": Case([_post(STATUS, length=LIMIT + 1)], 1, 0),
    "chunked": Case(
        [
            b"POST /api/command HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(json.dumps(STATUS)) + json.dumps(STATUS).encode() + b"\r\n0\r\n\r\n"
        ],
        1,
        0,
    ),
    "length-and-chunked": Case(
        [_post(STATUS, head="Transfer-Encoding: chunked\r\n")], 1, 0
    ),
    "duplicate-length": Case(
        [_post(STATUS, head="Content-Length: {}\r\n".format(len(json.dumps(STATUS))))], 1, 0
    ),
    "signed-length": Case([_post(STATUS).replace(b"Length: ", b"Length: +")], 1, 0),
    "zero-length": Case([_post(b"", length=0)], 1, 0),
    "expect-continue": Case([_post(STATUS, head="Expect: 100-continue\r\n")], 1, 0),
    "connection-close": Case([_post(STATUS, head="Connection: close\r\n")], 1, 0),
    "connection-upgrade": Case(
        [_post(STATUS, head="Connection: Upgrade\r\nUpgrade: websocket\r\n")], 1, 0
    ),
    "http-1.0": Case([_post(STATUS).replace(b"HTTP/1.1", b"HTTP/1.0", 1)], 1, 0),
    "obs-fold": Case([_post(STATUS, head="X-Folded: a\r\n b\r\n")], 1, 0),
    "space-before-colon": Case([_post(STATUS, head="X-Odd : a\r\n")], 1, 0),
    "nul-in-value": Case([_post(STATUS, head="X-Odd: a\x00b\r\n")], 1, 0),
    "bare-lf": Case([_post(STATUS, head="X-Odd: a\nb\r\n")], 1, 0),
    "host-not-utf8": Case([_post(STATUS).replace(b"Host: 127.0.0.1", b"Host: \xff")], 1, 0),
    "query": Case([_post(STATUS).replace(b"/api/command", b"/api/command?x=1", 1)], 1, 0),
    "trailing-slash": Case([_post(STATUS).replace(b"/api/command", b"/api/command/", 1)], 1, 0),
    "leading-empty-line": Case([b"\r\n" + _post(STATUS)], 1, 0),
    "split-head": Case([_post(STATUS)[:40], _post(STATUS)[40:]], 1, 0),
    "split-body": Case([_post(STATUS)[:-5], _post(STATUS)[-5:]], 1, 0),
    "split-then-whole": Case([_post(STATUS)[:-5], _post(STATUS)[-5:], _post(METRICS)], 2, 1),
    "pipelined-reads": Case([_post(STATUS) + _post(METRICS) + _post(STATUS)], 3, 3),
    "pipelined-mixed": Case(
        [
            _post(STATUS)
            + _post(b"{not json")
            + _post(METRICS)
            + _post({"action": "get_server_status", "serverId": "nope"})
            + _post(STATUS)
        ],
        5,
        1,
    ),
    "pipelined-then-partial": Case(
        [_post(STATUS) + _post(METRICS)[:30], _post(METRICS)[30:]], 2, 1
    ),
    "pipelined-after-wrong-secret": Case([_post(STATUS, secret="wrong") + _post(STATUS)], 1, 0),
    # Twisted answers the second at once, in the turn the plain answer waits
    # to be sent in: the plain one still leaves first.
    "wrong-secret-after-plain": Case([_post(STATUS) + _post(STATUS, secret="wrong")], 2, 1),
    "slow-command": Case([_post({"action": "start_server", "serverId": "s1"})], 1, 0, slow=True),
    # The read after the slow command waits in Twisted's buffer; once the slow
    # one is answered Twisted hands it back to the channel, idle again: plain.
    "pipelined-slow": Case(
        [_post(STATUS) + _post({"action": "start_server", "serverId": "s1"}) + _post(METRICS)],
        3,
        2,
        slow=True,
    ),
}


class RawClient(Protocol):
    """Writes what it is told and keeps everything the server sends."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


def _answers(raw: bytes) -> int:
    """How many whole answers ``raw`` holds (a ``100 Continue`` is not one)."""
    count = position = 0
    while True:
        end = raw.find(b"\r\n\r\n", position)
        if end < 0:
            return count
        head = raw[position:end]
        match = _LENGTH.search(head)
        position = end + 4 + (int(match.group(1)) if match else 0)
        if position > len(raw):
            return count
        if not head.startswith(b"HTTP/1.1 100 "):
            count += 1


def _without_date(raw: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r\n]*", b"", raw)


@dataclass
class Listener:
    """A fresh API (one server ``s1``) on a real listener, and what it did."""

    rig: ApiRig
    service: HttpService
    port: int
    dispatched: list[str] = field(default_factory=list)
    observed: list[tuple[str, bool]] = field(default_factory=list)
    logged: list[tuple[str, str]] = field(default_factory=list)

    @property
    def site(self) -> GuardedSite:
        return self.service.site


async def _listen(plain: bool) -> Listener:
    rig = ApiRig(max_body_bytes=LIMIT)
    created = rig.dispatcher.dispatch(
        Command("create_server", "s1", {"name": "one", "image": "img"})
    )
    assert created.called
    http = replace(rig.config.http, endpoint="tcp:0:interface=127.0.0.1")
    config = replace(rig.config, http=http)
    service = make_http_service(reactor, config, rig.api, drain_timeout=5.0)
    assert isinstance(service, HttpService)
    ports: list[Any] = []
    service.startService()
    service._waitingForPort.addCallback(lambda p: ports.append(p) or p)  # type: ignore[attr-defined]
    assert ports, "the listener did not bind"
    if not plain:
        service.site.plain_command = None
    listener = Listener(rig, service, ports[0].getHost().port)
    dispatch = rig.dispatcher.dispatch

    def counting(command: Command) -> Any:
        listener.dispatched.append(command.action)
        return dispatch(command)

    rig.dispatcher.dispatch = counting  # type: ignore[method-assign]
    rig.api._observe_command = lambda action, seconds, ok: listener.observed.append((action, ok))
    return listener


@pytest.fixture
def log_lines() -> Iterator[list[tuple[str, str]]]:
    """The agent's own log events (namespace, format), debug ones included."""
    lines: list[tuple[str, str]] = []

    def observer(event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace", "")
        if namespace.startswith("ctrlagent"):
            lines.append((namespace, str(event.get("log_format"))))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


async def _exchange(listener: Listener, case: Case) -> bytes:
    """Send ``case``'s chunks; the bytes answered once its answers are in (or it closed)."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port), client)
    gate = listener.rig.servers.hold("start") if case.slow else None
    for chunk in case.chunks:
        client.transport.write(chunk)  # type: ignore[union-attr]
        await _sleep(0.02 if len(case.chunks) > 1 else 0)
    if gate is not None:
        for _ in range(250):
            if listener.rig.api.in_flight or client.closed.called:
                break
            await _sleep(0.02)
        # Held for the drain meanwhile, and bounded by a deadline.
        assert listener.rig.api.in_flight == 1
        assert listener.rig.clock.getDelayedCalls()
        gate.callback(None)
    for _ in range(250):
        if client.closed.called or _answers(client.received) >= case.answers:
            break
        await _sleep(0.02)
    client.transport.loseConnection()  # type: ignore[union-attr]
    await client.closed
    return client.received


async def _run(plain: bool, case: Case, log_lines: list[tuple[str, str]]) -> tuple[bytes, Listener]:
    listener = await _listen(plain)
    del log_lines[:]
    try:
        answer = await _exchange(listener, case)
    finally:
        await listener.service.stopService()
    listener.logged = list(log_lines)
    return answer, listener


@pytest.mark.parametrize("name", list(CASES))
@pytest_twisted.ensureDeferred
async def test_the_plain_path_answers_every_request_as_twisted_does(
    name: str, log_lines: list[tuple[str, str]]
) -> None:
    case = CASES[name]
    plain_answer, plain = await _run(True, case, log_lines)
    twisted_answer, reference = await _run(False, case, log_lines)
    assert _answers(twisted_answer) == case.answers
    assert plain_answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))
    assert _without_date(plain_answer) == _without_date(twisted_answer)
    # The same commands ran, each once; the same metrics; the same log lines.
    assert plain.dispatched == reference.dispatched
    assert plain.observed == reference.observed
    assert plain.logged == reference.logged
    # Which requests took the plain path (the reference never does).
    assert plain.site.plain_answers == case.plain
    assert reference.site.plain_answers == 0


@pytest_twisted.ensureDeferred
async def test_plain_reads_make_no_request_and_no_route_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[object] = []
    original = GuardedSite.requestFactory.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSite.requestFactory, "__init__", counting)
    listener = await _listen(True)
    try:
        answer = await _exchange(listener, Case([_post(STATUS) + _post(METRICS)] * 3, 6, 6))
    finally:
        await listener.service.stopService()
    assert answer.count(b'"success":true') == 6
    assert listener.site.plain_answers == 6
    assert made == []
    assert listener.dispatched == ["get_server_status", "get_server_metrics"] * 3
    assert listener.observed == [("get_server_status", True), ("get_server_metrics", True)] * 3


@pytest_twisted.ensureDeferred
async def test_a_slow_plain_command_survives_its_client_and_holds_the_shutdown() -> None:
    listener = await _listen(True)
    rig = listener.rig
    gate = rig.servers.hold("start")
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port), client)
    client.transport.write(_post({"action": "start_server", "serverId": "s1"}))  # type: ignore[union-attr]
    for _ in range(250):
        if rig.api.in_flight:
            break
        await _sleep(0.02)
    assert rig.api.in_flight == 1
    assert listener.dispatched == ["start_server"]
    # The client leaves; the start goes on, and shutdown waits for it.
    client.transport.loseConnection()  # type: ignore[union-attr]
    await client.closed
    await _sleep(0.05)
    stopped = listener.service.stopService()
    fired: list[object] = []
    stopped.addBoth(fired.append)
    await _sleep(0.05)
    assert fired == []
    gate.callback(None)
    await stopped
    assert rig.api.in_flight == 0
    assert rig.servers.status("s1").state in ("starting", "running")
    assert listener.dispatched == ["start_server"]
    assert listener.site.plain_answers == 0


@pytest_twisted.ensureDeferred
async def test_a_slow_command_is_answered_by_its_deadline_on_the_plain_path() -> None:
    listener = await _listen(True)
    rig = listener.rig
    gate = rig.servers.hold("start")
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port), client)
    try:
        client.transport.write(_post({"action": "start_server", "serverId": "s1"}))  # type: ignore[union-attr]
        for _ in range(250):
            if rig.api.in_flight:
                break
            await _sleep(0.02)
        timeouts = rig.config.timeouts
        rig.clock.advance(timeouts.command_answer + timeouts.command_margin + 1)
        for _ in range(250):
            if _answers(client.received):
                break
            await _sleep(0.02)
        answer = json.loads(client.received.split(b"\r\n\r\n", 1)[1])
        assert answer["success"] is True or answer["code"] == "EXECUTION_ERROR"
        gate.callback(None)
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        await listener.service.stopService()
    assert listener.dispatched == ["start_server"]


# -- the channel's guards, on a Clock ------------------------------------------------


def _channel(
    rig: ApiRig, clock: Clock, **kwargs: Any
) -> tuple[GuardedSite, GuardedChannel, StringTransport]:
    site = GuardedSite(
        rig.api.resource(),
        max_body_bytes=LIMIT,
        clock=clock,
        authorize=rig.api.authorized,
        plain_command=rig.api.answer_plain_command,
        **kwargs,
    )
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert isinstance(channel, GuardedChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    return site, channel, transport


def _rig() -> ApiRig:
    rig = ApiRig(max_body_bytes=LIMIT)
    assert rig.dispatcher.dispatch(Command("create_server", "s1", {"image": "img"})).called
    return rig


def test_after_a_plain_answer_the_next_request_has_its_header_deadline() -> None:
    clock = Clock()
    site, channel, out = _channel(_rig(), clock, header_timeout=5.0, idle_timeout=60.0)
    channel.dataReceived(_post(STATUS))
    assert site.plain_answers == 1
    assert b'"success":true' in out.value()
    out.clear()
    # The first deadline (armed at connect) was met and is gone.
    clock.advance(6)
    assert out.value() == b""
    assert not out.disconnecting
    channel.dataReceived(_post(STATUS)[:20])
    clock.advance(5.1)
    assert out.value().startswith(b"HTTP/1.1 408 ")
    assert out.disconnecting


def test_a_plain_answer_restarts_the_idle_timeout() -> None:
    clock = Clock()
    site, channel, out = _channel(_rig(), clock, header_timeout=0, idle_timeout=10.0)
    for _ in range(3):
        clock.advance(8)
        channel.dataReceived(_post(STATUS))
    assert site.plain_answers == 3
    assert not out.disconnecting
    clock.advance(10.5)
    assert out.disconnecting


def test_a_connection_with_plain_answers_is_the_panels_and_never_evicted() -> None:
    clock = Clock()
    site, channel, out = _channel(_rig(), clock)
    assert channel.evictable
    channel.dataReceived(_post(STATUS))
    assert site.plain_answers == 1
    assert not channel.evictable
    _, stranger, _ = _channel(_rig(), clock)
    stranger.dataReceived(_post(STATUS, secret="wrong"))
    assert stranger.refused_unauthenticated == 1


def test_a_command_no_request_takes_over_is_kept_and_reported(
    monkeypatch: pytest.MonkeyPatch, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    rig = _rig()
    clock = Clock()
    site, channel, out = _channel(rig, clock)
    gate = rig.servers.hold("start")
    # A bug: the route refuses what the listener accepted.
    monkeypatch.setattr(rig.api, "authorized", lambda request: False)
    channel.dataReceived(_post({"action": "start_server", "serverId": "s1"}))
    assert out.value().startswith(b"HTTP/1.1 401 ")
    assert len(fail_on_logged_errors) == 1
    assert "left without its request" in str(fail_on_logged_errors[0].get("what"))
    fail_on_logged_errors.clear()
    # The start is tracked with the API's commands (a drain waits for it), not lost.
    assert rig.api.in_flight == 1
    gate.callback(None)
    assert rig.api.in_flight == 0


# -- the parser against Twisted's ----------------------------------------------------


class _Recorder(Resource):
    """Keeps what Twisted read of each request and never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Any) -> Any:
        self.seen.append(
            {
                "method": request.method,
                "uri": request.uri,
                "version": request.clientproto,
                "authorization": request.getHeader(b"authorization"),
                "api_key": request.getHeader(b"x-api-key"),
                "body": request.content.read(),
                "persistent": request.channel.persistent,
            }
        )
        return NOT_DONE_YET


_NAMES = st.sampled_from(
    [
        "Host", "host", "Authorization", "authorization", "X-API-Key", "x-api-key",
        "Content-Length", "content-length", "Transfer-Encoding", "Expect", "Connection",
        "Upgrade", "Accept", "X-Odd", "X Odd", "", "X-Odd ", " X-Odd",
    ]
)
_VALUES = st.one_of(
    st.sampled_from(
        ["Bearer " + SECRET, SECRET, "keep-alive", "close", "chunked", "100-continue", "12", "0",
         "+5", "-1", " 7 ", "99999999999999999999", "1e3", "127.0.0.1"]
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=20),
)


@st.composite
def _requests(draw: Any) -> bytes:
    body = draw(st.binary(max_size=40))
    lines = [
        draw(
            st.sampled_from(
                [
                    "POST /api/command HTTP/1.1",
                    "POST /api/command HTTP/1.0",
                    "post /api/command HTTP/1.1",
                    "POST  /api/command HTTP/1.1",
                    "POST /api/command?x HTTP/1.1",
                ]
            )
        )
    ]
    for _ in range(draw(st.integers(0, 6))):
        lines.append("{}:{}".format(draw(_NAMES), draw(_VALUES)))
    if draw(st.booleans()):
        lines.append("Content-Length: {}".format(draw(st.integers(0, len(body) + 3))))
    if draw(st.booleans()):
        lines.append(" folded")
    raw = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        raw = raw.replace(b"\xc3", b"\xff")
    return raw + b"\r\n\r\n" + body + draw(st.sampled_from([b"", b"GET /x HTTP/1.1\r\n\r\n"]))


# A request the plain parser accepts: every run of the property below holds
# at least this one to Twisted's reading.
_ACCEPTED = (b"POST /api/command HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s\r\n"
             b"Content-Length: 2\r\n\r\n{}")


def test_the_property_below_has_an_accepted_request_to_check() -> None:
    assert plain_command(_ACCEPTED, 64) is not None


@given(_requests())
@example(_ACCEPTED)
def test_whatever_the_plain_parser_accepts_twisted_reads_alike(data: bytes) -> None:
    command = plain_command(data, 64)
    if command is None:
        return
    recorder = _Recorder()
    site = GuardedSite(recorder, max_body_bytes=64, clock=Clock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data[: command.end] + b"GET /next HTTP/1.1\r\n\r\n")
    assert transport.value() == b"", "Twisted refused what the plain path accepts"
    assert recorder.seen == [
        {
            "method": b"POST",
            "uri": b"/api/command",
            "version": b"HTTP/1.1",
            "authorization": command.authorization,
            "api_key": command.api_key,
            "body": command.body,
            "persistent": True,
        }
    ]
    assert 0 < len(command.body) <= 64


def test_this_twisted_has_the_parser_state_the_plain_path_reads() -> None:
    # Without it the path stays off (and every answer comes from Twisted).
    assert PLAIN_PATH_FITS


# -- any bytes: the plain listener writes what Twisted writes ------------------------


_BODIES = st.sampled_from(
    [
        *[json.dumps(STATUS).encode(), json.dumps(METRICS).encode()] * 3,
        json.dumps({"action": "get_server_status", "serverId": "nope"}).encode(),
        json.dumps({"action": "no_such_action"}).encode(),
        b"{not json",
        b"[1, 2]",
        b'{"action": "get_server_status", "serverId": "\\ud800"}',
        b"",
    ]
)


@st.composite
def _command_bytes(draw: Any) -> bytes:
    body = draw(_BODIES)
    # Mostly plain requests, so that both paths are well exercised.
    version = "HTTP/1.0" if draw(st.integers(0, 9)) == 0 else "HTTP/1.1"
    lines = ["POST /api/command " + version]
    headers = [
        ("Host", "127.0.0.1"),
        ("Authorization", "Bearer " + (SECRET if draw(st.integers(0, 5)) else "wrong")),
        ("Content-Length", str(len(body))),
    ]
    if draw(st.integers(0, 3)) == 0:
        headers.append((draw(_NAMES), draw(_VALUES)))
    if draw(st.booleans()):
        headers.append(("Accept", "application/json"))
    headers = draw(st.permutations(headers))
    for name, value in headers:
        spelled = draw(st.sampled_from([name, name.lower(), name.upper()]))
        space = draw(st.sampled_from(["", " ", "\t "]))
        lines.append("{}:{}{}".format(spelled, space, value))
    raw = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body
    return raw


@settings(max_examples=300)
@given(
    st.lists(_command_bytes(), min_size=1, max_size=3),
    st.one_of(st.just([]), st.lists(st.integers(1, 400), max_size=3)),
)
def test_for_any_requests_the_plain_listener_writes_what_twisted_writes(
    requests: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(requests)
    written = []
    for plain in (True, False):
        rig = _rig()
        site, channel, out = _channel(rig, Clock())
        if not plain:
            site.plain_command = None
        start = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            if cut > start:
                if not out.disconnecting:
                    channel.dataReceived(data[start:cut])
                start = cut
        written.append(_without_date(out.value()))
        assert site.plain_answers <= len(requests)
        if plain:
            event("plain answers: {}".format(site.plain_answers))
    assert written[0] == written[1]


def test_an_answer_still_waiting_on_an_inner_deferred_goes_to_the_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _rig()
    site, channel, out = _channel(rig, Clock())
    inner: Deferred[ActionResult] = Deferred()

    def dispatch(command: Command) -> Deferred[ActionResult]:
        # Called, but paused on ``inner``: not an answer yet.
        outer: Deferred[Any] = Deferred()
        outer.callback(None)
        outer.addCallback(lambda _: inner)
        return outer

    monkeypatch.setattr(rig.dispatcher, "dispatch", dispatch)
    channel.dataReceived(_post(STATUS))
    assert out.value() == b""
    assert site.plain_answers == 0
    inner.callback(ActionResult({"serverId": "s1"}, None))
    assert json.loads(out.value().split(b"\r\n\r\n", 1)[1]) == {
        "success": True,
        "data": {"serverId": "s1"},
    }


def test_a_head_seen_before_is_judged_alike_and_the_body_limit_still_applies() -> None:
    from ctrlagent.api.site import _plain_head

    _plain_head.cache_clear()
    data = _post(STATUS)
    small = len(json.dumps(STATUS)) - 1
    assert plain_command(data, small) is None
    first = plain_command(data, LIMIT)
    again = plain_command(data, LIMIT)
    assert first is not None and first == again
    assert plain_command(data, small) is None
    assert _plain_head.cache_info().hits >= 3
    # Bounded, whatever heads strangers send.
    for n in range(200):
        plain_command(_post(STATUS, head="X-N: {}\r\n".format(n)), LIMIT)
    assert _plain_head.cache_info().currsize <= 64


_COMMAND_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["get_server_status", " get_server_metrics ", "", 3]),
        "serverId": st.one_of(
            st.sampled_from(["s1", "", None, 7, True, 2**60]), st.text(max_size=5)
        ),
        "payload": st.one_of(st.just({}), st.none(), st.dictionaries(st.sampled_from(
            ["serverId", "x", "panelId"]), st.sampled_from(["s2", "", None, 1]), max_size=2),
            st.just([])),
        "data": st.one_of(st.just({}), st.dictionaries(st.sampled_from(["serverId", "y"]),
                                                        st.sampled_from(["s3", None]), max_size=2)),
        "id": st.sampled_from([None, 1, "a"]),
    },
)


@given(st.one_of(_COMMAND_FIELDS.map(lambda body: json.dumps(body).encode()),
                 st.binary(max_size=40)))
def test_a_remembered_bare_command_is_what_parsing_its_body_gives(body: bytes) -> None:
    from ctrlagent.api.app import _bare_command
    from ctrlagent.wire.command import parse_command
    from ctrlagent.wire.json import decode_body

    for _ in range(2):  # first judged, then remembered
        bare = _bare_command(body)
        try:
            parsed: Command | None = parse_command(decode_body(body))
        except Exception:
            parsed = None
        if bare is None:
            assert parsed is None or parsed.params or parsed.command_id is not None
        else:
            assert parsed == Command(bare[0], bare[1], {})


# -- the answers of one reactor turn leave together, without a writer -------------------------


@pytest.mark.parametrize("plain", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_turns_plain_answers_are_sent_without_waiting_for_a_writable_socket(
    plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Twisted queues a write until the reactor finds the socket writable (two
    # epoll_ctl calls and an event per answer); plain answers are handed to
    # the kernel when the turn that made them is over.
    waited: list[object] = []
    sent_soon: list[int] = []
    add_writer = reactor.addWriter  # type: ignore[attr-defined]

    def counting(selectable: Any) -> None:
        if isinstance(selectable, tcp.Server):
            waited.append(selectable)
        add_writer(selectable)

    monkeypatch.setattr(reactor, "addWriter", counting)
    listener = await _listen(plain)
    send_soon = listener.site.send_soon

    def recording(channel: GuardedChannel) -> None:
        sent_soon.append(len(channel._unsent or ()))
        send_soon(channel)

    monkeypatch.setattr(listener.site, "send_soon", recording)
    try:
        answer = await _exchange(listener, Case([_post(STATUS) + _post(METRICS)] * 3, 6, 6))
    finally:
        await listener.service.stopService()
    assert _kinds(answer) == ["status", "metrics"] * 3
    assert listener.site.plain_answers == (6 if plain else 0)
    assert (waited == []) is plain
    # One send per turn (two answers each), arranged when its first answer is made.
    assert (set(sent_soon) == {1} and len(sent_soon) <= 3) if plain else sent_soon == []


def _kinds(raw: bytes) -> list[str]:
    """The answers in ``raw`` in order: status or metrics, by their data."""
    kinds = []
    position = 0
    while True:
        end = raw.find(b"\r\n\r\n", position)
        if end < 0:
            return kinds
        match = _LENGTH.search(raw[position:end])
        assert match is not None
        body = raw[end + 4 : end + 4 + int(match.group(1))]
        position = end + 4 + int(match.group(1))
        data = json.loads(body)["data"]
        kinds.append("status" if "panelStatus" in data else "metrics")


async def _one_channel(listener: Listener, client: RawClient) -> GuardedChannel:
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port), client)
    for _ in range(100):
        if listener.site.channels():
            break
        await _sleep(0.01)
    (channel,) = listener.site.channels()
    return channel


@contextlib.asynccontextmanager
async def _plain_tcp() -> AsyncIterator[tuple[Listener, RawClient, tcp.Server]]:
    """A plain-path listener, a raw client on it, and the agent's side of that connection."""
    listener = await _listen(True)
    client = RawClient()
    try:
        channel = await _one_channel(listener, client)
        server = channel.transport
        assert isinstance(server, tcp.Server)
        yield listener, client, server
    finally:
        if client.transport is not None:
            client.transport.loseConnection()
            await client.closed
        await listener.service.stopService()


@pytest_twisted.ensureDeferred
async def test_answers_the_kernel_cannot_take_yet_wait_in_order_for_a_slow_reader() -> None:
    async with _plain_tcp() as (listener, client, server):
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        count = 600
        client.transport.write((_post(STATUS) + _post(METRICS)) * (count // 2))  # type: ignore[union-attr]
        queued = False
        for _ in range(250):
            queued = bool(server._tempDataBuffer or server.dataBuffer)
            if queued:
                break
            await _sleep(0.02)
        # The kernel took what it could; the rest waits in Twisted's buffer,
        # and the channel reads no more requests meanwhile.
        assert queued
        assert 0 < listener.site.plain_answers < count
        client.transport.resumeProducing()  # type: ignore[union-attr]
        for _ in range(250):
            if _answers(client.received) >= count:
                break
            await _sleep(0.02)
        # Every one answered once, in order (those read after the pause by
        # Twisted's own path: the channel is not idle while its answers wait).
        assert _kinds(client.received) == ["status", "metrics"] * (count // 2)
        assert len(listener.dispatched) == count


class _FailingOnce:
    """A socket whose first ``send`` fails as a reset peer's would."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failed = 0

    def send(self, data: bytes) -> int:
        if not self.failed:
            self.failed += 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return self.real.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest_twisted.ensureDeferred
async def test_a_send_that_fails_leaves_the_answer_to_twisted() -> None:
    async with _plain_tcp() as (_, client, server):
        failing = server.socket = _FailingOnce(server.socket)  # type: ignore[assignment]
        client.transport.write(_post(STATUS))  # type: ignore[union-attr]
        for _ in range(250):
            if _answers(client.received) >= 1:
                break
            await _sleep(0.02)
        assert failing.failed == 1
        assert _kinds(client.received) == ["status"]


@pytest_twisted.ensureDeferred
async def test_answers_of_a_connection_gone_before_the_turn_ended_are_dropped_quietly(
    log_lines: list[tuple[str, str]],
) -> None:
    listener = await _listen(True)
    client = RawClient()
    try:
        channel = await _one_channel(listener, client)
        # The answer is made; the connection goes before the turn ends.
        channel.dataReceived(_post(STATUS))
        assert channel._unsent
        assert channel.transport is not None
        channel.transport.abortConnection()  # type: ignore[attr-defined]
        await client.closed
        await _sleep(0.02)
        assert channel._unsent is None
        assert listener.site.plain_answers == 1
        assert not [line for line in log_lines if "could not send" in line[1]]
    finally:
        await listener.service.stopService()


def test_a_transport_that_is_not_plain_tcp_is_written_as_twisted_writes() -> None:
    transport = StringTransport()
    write_now(transport, b"answer")
    assert transport.value() == b"answer"


class _Waiting:
    """A channel with answers to send, counting the sends."""

    def __init__(self) -> None:
        self.sent = 0

    def send_unsent(self) -> None:
        self.sent += 1


def test_answers_waiting_when_the_wall_clock_steps_back_are_sent_with_the_next() -> None:
    clock = Clock()
    clock.advance(1000)
    site, _, _ = _channel(_rig(), clock)
    first, second = _Waiting(), _Waiting()
    site.send_soon(first)  # type: ignore[arg-type]
    # The reactor's clock is the wall clock: stepped back an hour before the
    # turn ends, the call made for "now" would wait an hour.
    clock.rightNow -= 3600
    site.send_soon(second)  # type: ignore[arg-type]
    assert (first.sent, second.sent) == (1, 1)
    assert not [call for call in clock.getDelayedCalls() if call.active()
                and call.func == site._send_unsent]
    # And the next turn's answers are sent at its end, as ever.
    site.send_soon(first)  # type: ignore[arg-type]
    assert first.sent == 1
    clock.advance(0)
    assert first.sent == 2
