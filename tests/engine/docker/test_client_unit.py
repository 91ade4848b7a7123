"""
Unit tests of the Docker client: no engine, no real time.

URL building with awkward ids, DOCKER_HOST parsing, error mapping of engine
answers (through ``StubTreq`` and a fake engine resource), the pure stats and
event parsing, and the stream machinery (backpressure, silence timeout,
broken connections) with a ``Clock`` and a fake transport.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import (
    Conflict,
    ContainerGone,
    DockerClient,
    DockerError,
    DockerInvalidInput,
    DockerTimeout,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
    parse_docker_host,
    parse_image_ref,
)
from ctrlagent.engine.docker.models import format_since, parse_event, parse_pull_progress
from ctrlagent.engine.docker.stats import parse_stats
from ctrlagent.engine.docker.streams import ItemStream, LineStream
from ctrlagent.errors import Conflict as AgentConflict
from ctrlagent.errors import NotFound as AgentNotFound


class FakeEngine(Resource):
    """Answers every path from a table: path -> (status, body)."""

    isLeaf = True

    def __init__(self, answers: dict[str, tuple[int, Any]]) -> None:
        super().__init__()
        self.answers = answers
        self.seen: list[tuple[str, bytes]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.method.decode(), request.uri))
        path = request.path.decode()
        status, body = self.answers.get(path, (404, {"message": "page not found"}))
        request.setResponseCode(status)
        if isinstance(body, bytes):
            return body
        request.setHeader("content-type", "application/json")
        return json.dumps(body).encode()


def stub_client(
    answers: dict[str, tuple[int, Any]], **config: Any
) -> tuple[DockerClient, FakeEngine]:
    engine = FakeEngine(
        {"/version": (200, {"ApiVersion": "1.43", "Version": "24.0"}), **answers}
    )
    client = DockerClient(StubTreq(engine), Clock(), DockerConfig(**config))
    return client, engine


# -- URLs and hosts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cid", "encoded"),
    [
        ("abc123", "abc123"),
        ("my server", "my%20server"),
        ("a/b", "a%2Fb"),
        ("x?y#z", "x%3Fy%23z"),
        ("100%", "100%25"),
        ("é", "%C3%A9"),
    ],
)
def test_ids_are_percent_encoded_as_one_path_segment(cid: str, encoded: str) -> None:
    client, _ = stub_client({})
    client._api = "1.41"
    query = {"all": True, "filters": {"label": ["a=b c"]}}
    text = client.url("containers", cid, "json", query=query)
    assert text.startswith("http://docker/v1.41/containers/{}/json?".format(encoded))
    assert "all=1" in text
    assert "filters=%7B%22label%22%3A%5B%22a%3Db%20c%22%5D%7D" in text


@given(cid=st.text(min_size=1, max_size=40).filter(lambda t: t not in (".", "..")))
@settings(max_examples=200, deadline=None)
def test_any_id_round_trips_through_exactly_one_encoded_segment(cid: str) -> None:
    from urllib.parse import unquote, urlsplit

    client, _ = stub_client({})
    client._api = "1.41"
    text = client.url("containers", cid, "json")
    path = urlsplit(text).path
    segments = path.split("/")
    assert segments[:3] == ["", "v1.41", "containers"] and segments[-1] == "json"
    assert len(segments) == 5, text  # "/" in the id never makes a new segment
    assert unquote(segments[3]) == cid
    assert "?" not in path and "#" not in text


def test_image_references_with_registry_port_and_tag_stay_one_segment() -> None:
    client, _ = stub_client({})
    client._api = "1.45"
    url = client.url("images", "127.0.0.1:5000/team/game:1.2", "json")
    assert url == (
        "http://docker/v1.45/images/127.0.0.1%3A5000%2Fteam%2Fgame%3A1.2/json"
    )


@pytest.mark.parametrize("bad", ["", ".", "..", "a\x00b"])
@pytest_twisted.ensureDeferred
async def test_dot_segments_and_empty_ids_are_refused_before_any_request(bad: str) -> None:
    client, engine = stub_client({})
    with pytest.raises(DockerInvalidInput):
        await client.container_inspect(bad)
    assert engine.seen == []


def test_docker_host_values() -> None:
    assert parse_docker_host("unix:///run/docker.sock").path == "/run/docker.sock"
    tcp = parse_docker_host("tcp://10.0.0.5:2375")
    assert (tcp.kind, tcp.hostname, tcp.port) == ("tcp", "10.0.0.5", 2375)
    assert parse_docker_host("tcp://docker.example", tls=True).kind == "tls"
    assert parse_docker_host("tcp://docker.example", tls=True).port == 2376
    assert parse_docker_host("https://docker.example:4443").kind == "tls"
    assert parse_docker_host("unix:///x").base_text == "http://docker"
    assert tcp.base_text == "http://10.0.0.5:2375"
    six = parse_docker_host("tcp://[::1]:2375")
    assert (six.hostname, six.port) == ("::1", 2375)
    assert six.base_text == "http://[::1]:2375"
    assert parse_docker_host("tcp://bücher.example:2375").base_text == (
        "http://xn--bcher-kva.example:2375")
    client = DockerClient(StubTreq(FakeEngine({})), Clock(), DockerConfig(), host=six)
    client._api = "1.41"
    assert client.url("containers", "json") == "http://[::1]:2375/v1.41/containers/json"
    with pytest.raises(DockerInvalidInput):
        parse_docker_host("ssh://host")
    with pytest.raises(DockerInvalidInput):
        parse_docker_host("unix://relative.sock")


def test_image_references() -> None:
    ref = parse_image_ref("127.0.0.1:5000/ctrlagent/scripted:1")
    assert (ref.registry, ref.repository, ref.tag) == (
        "127.0.0.1:5000", "127.0.0.1:5000/ctrlagent/scripted", "1")
    assert parse_image_ref("busybox").tag == "latest"
    assert parse_image_ref("busybox").registry == "docker.io"
    assert parse_image_ref("library/busybox:1.36").registry == "docker.io"
    assert parse_image_ref("localhost/x").registry == "localhost"
    digest = parse_image_ref("ghcr.io/a/b@sha256:" + "0" * 64)
    assert digest.registry == "ghcr.io" and digest.tag.startswith("sha256:") and digest.is_digest


def test_since_keeps_nanoseconds() -> None:
    assert format_since(1700000000.5) == "1700000000.500000000"
    assert format_since(12) == "12.000000000"


def test_registry_credentials_are_sent_only_to_their_registry() -> None:
    import base64

    client, _ = stub_client(
        {}, registry_auths={"https://127.0.0.1:5000": {"username": "u", "password": "p"}}
    )
    header = client.registry_auth("127.0.0.1:5000")
    assert header is not None
    doc = json.loads(base64.urlsafe_b64decode(header))
    assert doc == {"serveraddress": "127.0.0.1:5000", "username": "u", "password": "p"}
    assert client.registry_auth("docker.io") is None


# -- error mapping -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_engine_answers_map_to_typed_errors() -> None:
    client, engine = stub_client(
        {
            "/v1.43/containers/gone/json": (404, {"message": "No such container: gone"}),
            "/v1.43/containers/busy/rename": (409, {"message": "name in use"}),
            "/v1.43/images/nope/json": (404, {"message": "No such image: nope"}),
            "/v1.43/containers/x/start": (500, {"message": "cannot start: boom"}),
        }
    )
    with pytest.raises(ContainerGone) as gone:
        await client.container_inspect("gone")
    assert isinstance(gone.value, AgentNotFound) and isinstance(gone.value, NotFound)
    assert gone.value.status == 404 and gone.value.code == "CONTAINER_NOT_FOUND"
    assert "No such container" in gone.value.message
    with pytest.raises(Conflict) as busy:
        await client.container_rename("busy", "x")
    assert isinstance(busy.value, AgentConflict) and busy.value.status == 409
    with pytest.raises(ImageNotFound):
        await client.image_inspect("nope")
    with pytest.raises(DockerError) as boom:
        await client.container_start("x")
    assert (boom.value.status, boom.value.message) == (500, "cannot start: boom")
    # The version was negotiated once for all these calls.
    assert [uri for _, uri in engine.seen].count(b"/version") == 1
    assert client.api_version == "1.43"


@pytest_twisted.ensureDeferred
async def test_error_bodies_are_read_with_a_size_cap() -> None:
    huge = b"x" * (1024 * 1024)
    client, _ = stub_client({"/v1.43/info": (500, huge)})
    with pytest.raises(DockerError) as e:
        await client.info()
    assert e.value.status == 500
    assert len(e.value.message) <= 64 * 1024


@pytest_twisted.ensureDeferred
async def test_newer_engines_are_spoken_to_at_our_newest_api_and_old_ones_refused() -> None:
    client, _ = stub_client({"/version": (200, {"ApiVersion": "1.51"})})
    await client.version()
    assert client.api_version == "1.45"
    old, _ = stub_client({"/version": (200, {"ApiVersion": "1.40"})})
    with pytest.raises(DockerError, match="older than the minimum"):
        await old.version()


@pytest_twisted.ensureDeferred
async def test_a_missing_socket_is_docker_unavailable_at_once(tmp_path: Any) -> None:
    from twisted.internet import reactor

    client = DockerClient.from_config(
        reactor, DockerConfig(host="unix://{}/nothing.sock".format(tmp_path))
    )
    with pytest.raises(DockerUnavailable, match="unavailable"):
        await client.ping()
    with pytest.raises(DockerUnavailable):
        await client.container_list()


@pytest_twisted.ensureDeferred
async def test_a_socket_path_longer_than_an_address_holds_is_reached(tmp_path: Any) -> None:
    """A socket deep in a long directory: reached, or unavailable, never a reactor TypeError."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "engine.sock"
    assert len(str(sock)) > 107
    missing = DockerClient.from_config(reactor, DockerConfig(host="unix://{}/nothing.sock".format(deep)))
    with pytest.raises(DockerUnavailable, match="unavailable"):
        await missing.ping()
    gone = DockerClient.from_config(reactor, DockerConfig(host="unix://{}/x/y.sock".format(deep)))
    with pytest.raises(DockerUnavailable, match="unavailable"):
        await gone.ping()

    class Ping(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted's name)
            request.setHeader(b"Api-Version", b"1.45")
            return b"OK"

    # Listen through the directory too (bind has the same limit); the port
    # unlinks its path on close, so the descriptor stays open until then.
    fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    try:
        port = reactor.listenUNIX("/proc/self/fd/{}/engine.sock".format(fd), Site(Ping()))
        try:
            client = DockerClient.from_config(reactor, DockerConfig(host="unix://{}".format(sock)))
            assert await client.ping() is True
            await client.close()
        finally:
            await port.stopListening()
    finally:
        os.close(fd)


@pytest_twisted.ensureDeferred
async def test_a_call_that_never_answers_times_out_as_unavailable() -> None:
    class Hanging:
        def request(self, *args: Any, **kw: Any) -> Deferred[Any]:
            return Deferred()

    clock = Clock()
    client = DockerClient(Hanging(), clock, DockerConfig(call_timeout=5))
    d = Deferred.fromCoroutine(client.ping())
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(DockerTimeout):
        await d


@pytest.mark.parametrize(
    "failure",
    [
        lambda: ConnectingCancelledError(None),
        lambda: ResponseNeverReceived([Failure(CancelledError())]),
        lambda: ResponseFailed([Failure(CancelledError())]),
    ],
    ids=["while-connecting", "before-the-answer", "mid-answer"],
)
@pytest_twisted.ensureDeferred
async def test_cancelling_a_call_is_a_cancellation_not_an_engine_failure(failure: Any) -> None:
    # What treq's Agent reports when a caller (a shutting-down or dying
    # manager) cancels a request: it must read as CancelledError, which the
    # tracker ignores, never as a broken engine or an unexpected error.
    class Cancellable:
        def request(self, *args: Any, **kw: Any) -> Deferred[Any]:
            return Deferred(lambda d: d.errback(failure()))

    client = DockerClient(Cancellable(), Clock(), DockerConfig(call_timeout=5))
    d = Deferred.fromCoroutine(client.ping())
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    # the stdin pipe connects on its own: the same holds there
    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            return Deferred(lambda d: d.errback(ConnectingCancelledError(None)))

    class Endpoints:
        def endpoint(self) -> Endpoint:
            return Endpoint()

    piped = DockerClient(Cancellable(), Clock(), DockerConfig(), endpoints=Endpoints(),  # type: ignore[arg-type]
                         host=parse_docker_host("unix:///run/docker.sock"))
    piped._api = "1.41"
    attach = Deferred.fromCoroutine(piped.attach_stdin("abc"))
    attach.cancel()
    with pytest.raises(CancelledError):
        await attach
    # the engine really failing is still "unavailable"
    class Broken:
        def request(self, *args: Any, **kw: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(ResponseNeverReceived([Failure(ConnectionLost())]))
            return d

    with pytest.raises(DockerUnavailable):
        await DockerClient(Broken(), Clock(), DockerConfig()).ping()


# -- pure parsing --------------------------------------------------------------


def test_stats_follow_the_docker_stats_formulas() -> None:
    doc = {
        "read": "2026-01-01T00:00:01Z",
        "cpu_stats": {
            "cpu_usage": {"total_usage": 3_000_000_000},
            "system_cpu_usage": 20_000_000_000,
            "online_cpus": 2,
        },
        "precpu_stats": {
            "cpu_usage": {"total_usage": 2_000_000_000},
            "system_cpu_usage": 10_000_000_000,
        },
        "memory_stats": {
            "usage": 100 * 2**20,
            "limit": 256 * 2**20,
            "stats": {"total_inactive_file": 30 * 2**20},
        },
        "networks": {
            "eth0": {"rx_bytes": 10, "tx_bytes": 20},
            "eth1": {"rx_bytes": 1, "tx_bytes": 2},
        },
        "blkio_stats": {
            "io_service_bytes_recursive": [
                {"op": "Read", "value": 4096},
                {"op": "Write", "value": 8192},
                {"op": "read", "value": 1},
                {"op": "Total", "value": 99999},
            ]
        },
        "pids_stats": {"current": 7},
    }
    s = parse_stats(doc)
    assert s.cpu_percent == pytest.approx(20.0)
    assert s.memory_bytes == 70 * 2**20
    assert s.memory_limit_bytes == 256 * 2**20
    assert (s.rx_bytes, s.tx_bytes) == (11, 22)
    assert (s.blk_read, s.blk_write) == (4097, 8192)
    assert s.pids == 7
    cgroup2 = dict(doc, memory_stats={"usage": 50, "limit": 100, "stats": {"inactive_file": 20}})
    assert parse_stats(cgroup2).memory_bytes == 30
    first_sample = dict(doc, precpu_stats={})
    assert parse_stats(first_sample).cpu_percent == 0.0


def test_events_carry_exit_code_labels_and_nanosecond_time() -> None:
    event = parse_event(
        {
            "Type": "container",
            "Action": "die",
            "Actor": {"ID": "abc", "Attributes": {"exitCode": "3", "name": "s1", "x": "y"}},
            "time": 1700000000,
            "timeNano": 1700000000123456789,
        }
    )
    assert (event.action, event.container_id, event.exit_code) == ("die", "abc", 3)
    assert event.labels["x"] == "y" and event.name == "s1"
    assert event.time_nano == 1700000000123456789
    assert event.time == pytest.approx(1700000000.123456789)


def test_pull_progress_percent() -> None:
    p = parse_pull_progress(
        {"status": "Downloading", "id": "abc", "progressDetail": {"current": 50, "total": 200}}
    )
    assert (p.layer, p.status, p.percent) == ("abc", "Downloading", 25.0)
    assert parse_pull_progress({"status": "Pulling fs layer", "id": "abc"}).percent is None
    failed = parse_pull_progress({"errorDetail": {"message": "nope"}, "error": "nope"})
    assert failed.error == "nope"


# -- streams -------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


class FakeResponse:
    code = 200

    def __init__(self) -> None:
        self.protocol: Any = None
        self.transport = FakeTransport()

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def fake_stream(clock: Clock, **kw: Any) -> tuple[LineStream, FakeResponse]:
    response = FakeResponse()

    async def open() -> FakeResponse:
        return response

    stream = LineStream.console(clock, open, tty=True, line_cap=1000, **kw)
    return stream, response


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(b"%d\n" % i for i in range(start, start + n))


@pytest_twisted.ensureDeferred
async def test_a_slow_consumer_pauses_the_engine_and_resumes_it() -> None:
    clock = Clock()
    stream, response = fake_stream(clock)
    stream._high, stream._low = 100, 25
    response.protocol.dataReceived(lines(150))
    clock.advance(0)  # chunks of one reactor turn are decoded together
    assert response.transport.paused
    got = []
    for _ in range(124):
        got.append(await stream.__anext__())
    assert response.transport.paused  # 26 left: still above the low-water mark
    got.append(await stream.__anext__())
    assert not response.transport.paused
    response.protocol.dataReceived(lines(10, 150))
    response.protocol.connectionLost(Failure(ResponseDone()))
    async for item in stream:
        got.append(item)
    assert [int(line) for _, line in got] == list(range(160))


@pytest_twisted.ensureDeferred
async def test_a_silent_stream_times_out_but_not_while_we_are_paused() -> None:
    clock = Clock()
    stream, response = fake_stream(clock, silence_timeout=5.0)
    stream._high, stream._low = 10, 2
    response.protocol.dataReceived(lines(20))
    clock.advance(0)
    assert response.transport.paused
    clock.advance(60)  # our own consumer is slow: not the engine's silence
    assert not stream.done
    batch = await stream.next_batch(100)
    assert len(batch) == 20 and not response.transport.paused
    clock.advance(4)
    assert not stream.done
    clock.advance(2)
    with pytest.raises(DockerTimeout):
        await stream.__anext__()
    assert response.transport.stopped


@pytest_twisted.ensureDeferred
async def test_a_broken_connection_delivers_what_arrived_then_raises_unavailable() -> None:
    stream, response = fake_stream(Clock())
    response.protocol.dataReceived(b"one\ntwo\npart")
    response.protocol.connectionLost(Failure(ConnectionLost("engine went away")))
    assert [line async for line in _take(stream, 3)] == [
        ("stdout", "one"), ("stdout", "two"), ("stdout", "part")]
    with pytest.raises(DockerUnavailable, match="broken"):
        await stream.__anext__()


@pytest_twisted.ensureDeferred
async def test_close_ends_iteration_cleanly_and_stops_the_transport() -> None:
    stream, response = fake_stream(Clock())
    response.protocol.dataReceived(b"one\n")
    waiter = Deferred.fromCoroutine(_collect(stream))
    stream.close()
    assert response.transport.stopped
    assert await waiter == [("stdout", "one")]


@pytest_twisted.ensureDeferred
async def test_an_open_error_surfaces_on_first_iteration() -> None:
    async def open() -> Any:
        raise ContainerGone("No such container: x")

    stream: ItemStream[Any] = LineStream.console(Clock(), open, tty=False, line_cap=10)
    with pytest.raises(ContainerGone):
        await stream.__anext__()


async def _take(stream: Any, n: int) -> Any:
    for _ in range(n):
        yield await stream.__anext__()


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


def test_frames_helper_matches_the_engine_format() -> None:
    assert struct.pack(">BxxxL", 1, 5) == b"\x01\x00\x00\x00\x00\x00\x00\x05"


@pytest_twisted.ensureDeferred
async def test_chunks_of_one_reactor_turn_wake_the_consumer_once() -> None:
    clock = Clock()
    stream, response = fake_stream(clock)
    batches: list[list[Any]] = []

    async def consume() -> None:
        async for batch in stream.batches():
            batches.append(batch)

    done = Deferred.fromCoroutine(consume())
    for i in range(50):
        response.protocol.dataReceived(b"%d\n" % i)
    assert batches == []
    clock.advance(0)
    assert [len(b) for b in batches] == [50]
    response.protocol.connectionLost(Failure(ResponseDone()))
    await done


def test_a_drained_stream_hands_each_reactor_turn_to_its_sink_once_and_in_order() -> None:
    clock = Clock()
    stream, response = fake_stream(clock)
    response.protocol.dataReceived(lines(3))
    clock.advance(0)  # queued before the drain: handed first, at once
    batches: list[list[Any]] = []
    done = stream.drain(batches.append, 40)
    assert [len(b) for b in batches] == [3]
    for i in range(3, 100):
        response.protocol.dataReceived(b"%d\n" % i)
    assert len(batches) == 1  # nothing until the reactor turn ends
    clock.advance(0)
    assert [len(b) for b in batches] == [3, 40, 40, 17]  # at most max_items each
    response.protocol.dataReceived(b"100\nunterminated")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert [line for batch in batches for _, line in batch] == (
        [str(i) for i in range(101)] + ["unterminated"])
    assert done.called and done.result is None
    assert not response.transport.paused and response.transport.pauses == 0


def test_a_drained_stream_fails_with_its_error_after_every_line_was_handed() -> None:
    stream, response = fake_stream(Clock())
    got: list[Any] = []
    done = stream.drain(got.extend)
    response.protocol.dataReceived(b"one\ntwo\npart")
    response.protocol.connectionLost(Failure(ConnectionLost("engine went away")))
    assert got == [("stdout", "one"), ("stdout", "two"), ("stdout", "part")]
    failure = _failure_of(done)
    assert failure.check(DockerUnavailable) and "broken" in failure.getErrorMessage()


def test_a_drained_stream_that_never_opened_fails_with_the_open_error() -> None:
    async def open() -> Any:
        raise ContainerGone("No such container: x")

    stream: ItemStream[Any] = LineStream.console(Clock(), open, tty=False, line_cap=10)
    assert _failure_of(stream.drain(lambda batch: None)).check(ContainerGone)


def test_a_sink_may_close_its_stream_and_nothing_more_is_handed() -> None:
    clock = Clock()
    stream, response = fake_stream(clock)
    got: list[Any] = []

    def sink(batch: list[Any]) -> None:
        got.extend(batch)
        stream.close()

    done = stream.drain(sink, 2)
    response.protocol.dataReceived(lines(6))
    clock.advance(0)
    assert got == [("stdout", "0"), ("stdout", "1")]
    assert response.transport.stopped and done.called and done.result is None
    response.protocol.dataReceived(lines(2))  # late bytes of a closed stream
    clock.advance(0)
    assert len(got) == 2


def test_a_failing_sink_closes_the_stream_and_fails_the_drain_with_its_error() -> None:
    clock = Clock()
    stream, response = fake_stream(clock)

    def sink(batch: list[Any]) -> None:
        raise ValueError("consumer bug")

    done = stream.drain(sink)
    response.protocol.dataReceived(lines(2))
    clock.advance(0)
    assert _failure_of(done).check(ValueError)
    assert response.transport.stopped and stream.done


def test_a_stream_is_drained_by_one_consumer_only() -> None:
    stream, _ = fake_stream(Clock())
    stream.drain(lambda batch: None)
    with pytest.raises(RuntimeError, match="drained already"):
        stream.drain(lambda batch: None)


def _failure_of(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1, "the Deferred did not fail"
    return failures[0]


@pytest_twisted.ensureDeferred
async def test_how_a_stream_ended_is_decided_by_its_end_check() -> None:
    seen: list[Any] = []

    async def check(error: Any) -> Any:
        seen.append(error)
        return None if error is None else ContainerGone("container x was removed")

    for reason, expected in ((ResponseDone(), None), (ConnectionLost("reset"), ContainerGone)):
        response = FakeResponse()

        async def open(response: FakeResponse = response) -> FakeResponse:
            return response

        stream = LineStream.console(Clock(), open, tty=True, line_cap=100, verify_end=check)
        response.protocol.dataReceived(b"last words\n")
        response.protocol.connectionLost(Failure(reason))
        assert await stream.__anext__() == ("stdout", "last words")
        if expected is None:
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
        else:
            with pytest.raises(expected):
                await stream.__anext__()
    assert seen[0] is None and isinstance(seen[1], DockerUnavailable)


@pytest.mark.parametrize("doc", [None, [], "x", {"networks": {"eth0": None}, "memory_stats": None}])
def test_stats_of_a_vanished_container_read_as_zeroes(doc: object) -> None:
    s = parse_stats(doc)
    assert s.cpu_percent == 0 and s.memory_bytes == 0 and s.rx_bytes == 0 and s.pids == 0


def test_console_lines_with_raw_byte_surrogates_reach_stdin_as_those_bytes() -> None:
    from twisted.internet.testing import StringTransport

    from ctrlagent.engine.docker.stdin import AttachStdinProtocol, StdinPipe

    proto = AttachStdinProtocol(b"")
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    pipe = StdinPipe(proto)
    # U+DCE9 is the byte 0xE9 (surrogateescape); a lone U+D800 cannot be
    # encoded at all and is replaced rather than raising.
    pipe.write_line("say caf\udce9\r\n")
    pipe.write_line("say \ud800!")
    assert transport.value() == b"say caf\xe9\nsay ?!\n"


class NetworkRace(Resource):
    """An engine where network ``net`` is being made elsewhere: it shows after ``hidden`` looks."""

    isLeaf = True

    def __init__(self, hidden: int, create: tuple[int, Any],
                 others: list[dict[str, Any]] | None = None, hold_create: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.create = create
        self.others = others or []  # the networks listed (not ``net``)
        self.hold_create = hold_create  # answer creates only when ``release`` is called
        self.held: list[Request] = []
        self.creates = 0
        self.looks = 0

    def release(self) -> None:
        status, body = self.create
        for request in self.held:
            request.setResponseCode(status)
            request.setHeader("content-type", "application/json")
            request.write(json.dumps(body).encode())
            request.finish()
        self.held.clear()

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        request.setHeader("content-type", "application/json")
        if path == "/version":
            return json.dumps({"ApiVersion": "1.43", "Version": "24.0"}).encode()
        if request.method == b"POST" and path.endswith("/networks/create"):
            self.creates += 1
            if self.hold_create:
                self.held.append(request)
                return NOT_DONE_YET
            status, body = self.create
            request.setResponseCode(status)
            return json.dumps(body).encode()
        if path.endswith("/networks"):
            return json.dumps(self.others).encode()
        if path.endswith("/networks/net"):
            self.looks += 1
            if self.looks <= self.hidden:
                request.setResponseCode(404)
                return json.dumps({"message": "network net not found"}).encode()
            return json.dumps({"Name": "net", "Id": "n1"}).encode()
        request.setResponseCode(404)
        return b"{}"


OVERLAP = (403, {"message": "Pool overlaps with other one on this address space"})


@pytest_twisted.ensureDeferred
async def test_a_create_refused_as_overlapping_gets_the_network_another_process_made() -> None:
    from ctrlagent.engine.docker.client import NETWORK_RACE_SECONDS

    engine = NetworkRace(hidden=6, create=OVERLAP)  # 2 looks before the create, 4 after
    clock = Clock()
    client = DockerClient(StubTreq(engine), clock, DockerConfig())
    got = Deferred.fromCoroutine(client.network_ensure("net", "10.9.0.0/24"))
    for _ in range(400):
        if got.called:
            break
        clock.advance(0.01)
    assert got.called and clock.seconds() < NETWORK_RACE_SECONDS
    assert (await got)["Id"] == "n1" and engine.creates == 1
    assert client._network_locks == {}


@pytest_twisted.ensureDeferred
async def test_a_refusal_no_other_process_explains_is_the_engines_error_after_the_window() -> None:
    from ctrlagent.engine.docker.client import NETWORK_RACE_SECONDS

    engine = NetworkRace(hidden=10**6, create=OVERLAP)
    clock = Clock()
    client = DockerClient(StubTreq(engine), clock, DockerConfig())
    got = Deferred.fromCoroutine(client.network_ensure("net", "10.9.0.0/24"))
    looked_at = []
    seen = engine.looks
    while not got.called and clock.seconds() < NETWORK_RACE_SECONDS + 1:
        clock.advance(0.01)
        if engine.looks != seen:
            seen = engine.looks
            looked_at.append(clock.seconds())
    assert got.called
    assert NETWORK_RACE_SECONDS <= clock.seconds() < NETWORK_RACE_SECONDS + 0.6
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(looked_at)]
    assert gaps == sorted(gaps) and gaps[0] < 0.2 and max(gaps) >= 0.45  # slowing down
    with pytest.raises(DockerError, match="Pool overlaps") as refused:
        await got
    assert not isinstance(refused.value, NotFound)
    assert client._network_locks == {}


@pytest.mark.parametrize("held", ["10.9.0.0/24", "10.0.0.0/8", "10.9.0.128/25"])
def test_a_subnet_another_network_overlaps_is_refused_at_once(held: str) -> None:
    holder = {"Name": "other", "IPAM": {"Config": [{"Subnet": held}]}}
    engine = NetworkRace(hidden=10**6, create=OVERLAP, others=[{"Name": "x"}, holder])
    client = DockerClient(StubTreq(engine), Clock(), DockerConfig())
    got = Deferred.fromCoroutine(client.network_ensure("net", "10.9.0.0/24"))
    assert got.called  # no clock advanced: at once
    failure = got.result
    got.addErrback(lambda _: None)
    assert failure.check(DockerError) and "Pool overlaps" in str(failure.value)
    assert engine.creates == 1 and client._network_locks == {}


@pytest.mark.parametrize("answer", [
    (400, {"message": "invalid CIDR address: 10.9.0.0/33"}),
    (500, {"message": "failed to program the bridge"}),
])
def test_a_refusal_no_race_can_explain_is_the_engines_error_at_once(
    answer: tuple[int, Any],
) -> None:
    engine = NetworkRace(hidden=10**6, create=answer)
    client = DockerClient(StubTreq(engine), Clock(), DockerConfig())
    got = Deferred.fromCoroutine(client.network_ensure("net", "10.9.0.0/33"))
    assert got.called
    failure = got.result
    got.addErrback(lambda _: None)
    assert failure.check(DockerError) and answer[1]["message"] in str(failure.value)
    assert engine.looks == 2  # the looks before the create, none after


@pytest_twisted.ensureDeferred
async def test_callers_of_one_client_make_a_missing_network_once() -> None:
    engine = NetworkRace(hidden=3, create=(201, {"Id": "n1"}), hold_create=True)
    stub = StubTreq(engine)
    client = DockerClient(stub, Clock(), DockerConfig())
    first = Deferred.fromCoroutine(client.network_ensure("net"))
    stub.flush()
    assert engine.creates == 1 and not first.called  # its create is in flight
    second = Deferred.fromCoroutine(client.network_ensure("net"))  # missing: waits for the lock
    stub.flush()
    assert engine.creates == 1 and not second.called
    engine.release()
    stub.flush()
    assert (await first)["Id"] == (await second)["Id"] == "n1"
    assert engine.creates == 1 and client._network_locks == {}
