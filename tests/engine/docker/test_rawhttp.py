"""
The streamed-response reader (``rawhttp``): an engine's answer cut anywhere,
malformed or cut short, against the ends ``twisted.web``'s client reports.

The real engines' streams (logs, attach, events, stats over Unix, TCP and
TLS) go through it in tests/engine/docker and tests/engine/podman; here the
bytes are ours, fed to the reader over a string transport.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss

from ctrlagent.engine.docker.rawhttp import (
    HEAD_CAP,
    StreamResponse,
    _StreamReader,
    open_stream,
    request_bytes,
)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\n"


class Body(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.end: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        assert self.end is None
        self.reads.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        assert self.end is None
        self.end = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.reads)


def connect(request: bytes = b"GET / HTTP/1.1\r\n\r\n") -> tuple[_StreamReader, StringTransport]:
    reader = _StreamReader(request)
    transport = StringTransport()
    reader.makeConnection(transport)
    return reader, transport


def head_of(reader: _StreamReader) -> StreamResponse:
    results: list[Any] = []
    reader.head.addBoth(results.append)
    assert results, "no head yet"
    assert isinstance(results[0], StreamResponse), results[0]
    return results[0]


def head_error(reader: _StreamReader) -> Failure:
    results: list[Any] = []
    reader.head.addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0]


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


def feed(reader: _StreamReader, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        if cut > last:
            reader.dataReceived(data[last:cut])
            last = cut


def test_the_request_sends_method_target_and_host() -> None:
    request = request_bytes("GET", "/v1.45/containers/a%20b/logs?follow=1", "docker")
    reader, transport = connect(request)
    assert transport.value() == (
        b"GET /v1.45/containers/a%20b/logs?follow=1 HTTP/1.1\r\nHost: docker\r\n"
        b"User-Agent: ctrlagent\r\n\r\n")


@pytest.mark.parametrize("part", ["a b", "x\r\nInjected: 1", "x\n", "\x00", "", "é"])
def test_a_request_never_carries_a_line_break_a_space_or_a_control(part: str) -> None:
    for args in (("GET", part, "docker"), ("GET", "/x", part), (part, "/x", "docker")):
        with pytest.raises(ValueError, match="cannot send"):
            request_bytes(*args)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=0, max_size=300), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    extension=st.booleans(),
)
def test_a_chunked_body_cut_anywhere_arrives_whole_and_ends_done(
    pieces: list[bytes], cuts: list[int], extension: bool
) -> None:
    reader, transport = connect()
    body = chunked(pieces)
    if extension:
        body = body.replace(b"\r\n", b";name=value\r\n", 1) if pieces and any(pieces) else body
    response = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body
    consumer = Body()
    feed(reader, response[:len(HEAD) + 2], [])  # not a whole head yet
    assert not reader.head.called
    feed(reader, response[len(HEAD) + 2:], cuts)
    head_of(reader).deliverBody(consumer)
    assert consumer.data == b"".join(pieces)
    assert consumer.end is not None and consumer.end.check(ResponseDone)
    assert transport.disconnecting  # one response per connection


def test_each_read_reaches_the_consumer_as_one_piece() -> None:
    reader, _ = connect()
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    reader.dataReceived(chunked([b"line 1\n", b"line 2\n", b"line 3\n"])[:-5])
    assert consumer.reads == [b"line 1\nline 2\nline 3\n"]
    reader.dataReceived(b"7\r\nline 4\n\r\n")
    assert consumer.reads[-1] == b"line 4\n"
    assert consumer.end is None


def test_a_body_with_a_length_ends_there_and_one_until_close_ends_with_the_connection() -> None:
    reader, transport = connect()
    reader.dataReceived(HEAD + b"Content-Length: 5\r\n\r\nhel")
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    reader.dataReceived(b"lo and more")
    assert consumer.data == b"hello"
    assert consumer.end is not None and consumer.end.check(ResponseDone)
    assert transport.disconnecting

    reader, _ = connect()
    reader.dataReceived(HEAD + b"\r\nraw stream")
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    reader.dataReceived(b" goes on")
    reader.connectionLost(Failure(ConnectionDone()))
    assert consumer.data == b"raw stream goes on"
    assert consumer.end is not None and consumer.end.check(PotentialDataLoss)


@pytest.mark.parametrize("code", [204, 304])
def test_an_answer_without_a_body_ends_at_once(code: int) -> None:
    reader, _ = connect()
    reader.dataReceived(b"HTTP/1.1 %d Nothing\r\n\r\n" % code)
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    assert consumer.data == b""
    assert consumer.end is not None and consumer.end.check(ResponseDone)


def test_informational_answers_are_skipped() -> None:
    reader, _ = connect()
    reader.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n"
                        b"Content-Length: 2\r\n\r\n{}")
    response = head_of(reader)
    assert (response.code, response.phrase, response.length) == (404, b"Not Found", 2)
    assert response.headers.getRawHeaders(b"content-length") == [b"2"]


@pytest.mark.parametrize("cut", [0, 20, 46])
def test_a_chunked_body_cut_short_is_a_failure_not_an_end(cut: int) -> None:
    reader, _ = connect()
    body = chunked([b"a" * 40])
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body[:cut])
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    reader.connectionLost(Failure(ConnectionLost()))
    assert consumer.end is not None and consumer.end.check(ResponseFailed)


@pytest.mark.parametrize(
    "head",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n : empty name\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
def test_a_malformed_head_fails_the_request_and_closes(head: bytes) -> None:
    reader, transport = connect()
    reader.dataReceived(head)
    assert head_error(reader).check(ResponseNeverReceived)
    assert transport.disconnecting
    reader.dataReceived(b"more")  # ignored


def test_a_head_never_ending_is_refused_past_its_cap() -> None:
    reader, transport = connect()
    reader.dataReceived(b"HTTP/1.1 200 OK\r\n")
    for _ in range(HEAD_CAP // 1000 + 2):
        if reader.head.called:
            break
        reader.dataReceived(b"X-Filler: " + b"x" * 990 + b"\r\n")
    error = head_error(reader)
    assert error.check(ResponseNeverReceived)
    assert "longer than" in str(error.value.reasons[0].value)  # type: ignore[union-attr]
    assert transport.disconnecting


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nxx\r\n", b"5\r\nhelloXX", b"-1\r\n", b"1" * 40 + b"\r\n", b" \r\n", b"5" * 2000],
)
def test_a_broken_chunk_fails_the_body_and_closes(body: bytes) -> None:
    reader, transport = connect()
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    reader.dataReceived(body)
    assert consumer.end is not None and consumer.end.check(ResponseFailed)
    assert transport.disconnecting
    reader.connectionLost(Failure(ConnectionLost()))  # no second end


def test_a_body_read_before_its_consumer_comes_is_held_then_reading_pauses() -> None:
    reader, transport = connect()
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    response = head_of(reader)
    piece = b"x" * 65536
    for _ in range(20):
        reader.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
    assert transport.producerState == "paused"
    consumer = Body()
    response.deliverBody(consumer)  # reading goes on
    assert consumer.data == piece * 20
    assert transport.producerState == "producing"
    reader.dataReceived(b"0\r\n\r\n")
    assert consumer.end is not None and consumer.end.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Body())

    # The whole body came before its consumer: held, then handed over with its end.
    reader, transport = connect()
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked([b"a", b"b"]))
    consumer = Body()
    head_of(reader).deliverBody(consumer)
    assert consumer.reads == [b"ab"]
    assert consumer.end is not None and consumer.end.check(ResponseDone)


def test_a_connection_lost_before_any_answer_fails_the_request() -> None:
    reader, _ = connect()
    reader.dataReceived(b"HTTP/1.1 200")
    reader.connectionLost(Failure(ConnectionLost()))
    assert head_error(reader).check(ResponseNeverReceived)


class _Endpoint:
    """An endpoint whose connection is made when the test says."""

    def __init__(self) -> None:
        self.pending: Deferred[Any] | None = None
        self.factory: Any = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factory = factory

        def cancel(_: Deferred[Any]) -> None:
            self.cancelled = True

        self.pending = Deferred(cancel)
        return self.pending

    def made(self) -> tuple[Protocol, StringTransport]:
        assert self.pending is not None
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.pending.callback(proto)
        return proto, transport


def test_cancelling_while_connecting_or_waiting_for_the_head_ends_the_connection() -> None:
    endpoint = _Endpoint()
    d = open_stream(endpoint, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    d.cancel()
    assert endpoint.cancelled
    assert d.called and isinstance(d.result, Failure) and d.result.check(CancelledError)
    d.addErrback(lambda _: None)

    endpoint = _Endpoint()
    d = open_stream(endpoint, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    proto, transport = endpoint.made()
    assert transport.value() == b"GET / HTTP/1.1\r\n\r\n"
    d.cancel()
    assert d.called and isinstance(d.result, Failure) and d.result.check(CancelledError)
    d.addErrback(lambda _: None)
    assert transport.disconnecting or getattr(transport, "aborted", False)


def test_a_failed_connect_fails_the_request_with_its_reason() -> None:
    endpoint = _Endpoint()
    d = open_stream(endpoint, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    assert endpoint.pending is not None
    endpoint.pending.errback(ConnectionLost("refused"))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionLost)


def test_the_head_fires_with_the_response_once_connected() -> None:
    endpoint = _Endpoint()
    d = open_stream(endpoint, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    proto, _ = endpoint.made()
    proto.dataReceived(HEAD + b"Content-Length: 2\r\n\r\nok")
    results: list[Any] = []
    d.addBoth(results.append)
    assert isinstance(results[0], StreamResponse) and results[0].code == 200
    consumer = Body()
    results[0].deliverBody(consumer)
    assert consumer.data == b"ok"


def test_a_late_consumers_own_pause_is_kept_after_the_held_body() -> None:
    from ctrlagent.engine.docker.rawhttp import _EARLY_CAP

    reader, transport = connect()
    reader.dataReceived(HEAD + b"\r\n" + b"x" * (_EARLY_CAP + 1))  # until close: held, paused
    assert transport.producerState == "paused"

    class Pauses(Body):
        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            super().dataReceived(data)
            self.transport.pauseProducing()

    consumer = Pauses()
    head_of(reader).deliverBody(consumer)
    assert consumer.data == b"x" * (_EARLY_CAP + 1)
    assert transport.producerState == "paused"  # the consumer's, not undone
    consumer.transport.resumeProducing()
    assert transport.producerState == "producing"


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_only_an_open_ended_answer_is_read_by_the_pacer(head: bytes) -> None:
    class Pacer:
        adopted: list[Any] = []

        def adopt(self, transport: Any, protocol: Any) -> None:
            self.adopted.append(transport)

    pacer = Pacer()
    reader = _StreamReader(b"GET / HTTP/1.1\r\n\r\n", pacer)  # type: ignore[arg-type]
    reader.makeConnection(StringTransport())
    reader.dataReceived(head)
    head_of(reader)
    assert pacer.adopted == []
    reader = _StreamReader(b"GET / HTTP/1.1\r\n\r\n", pacer)  # type: ignore[arg-type]
    reader.makeConnection(StringTransport())
    reader.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    assert len(pacer.adopted) == 1
