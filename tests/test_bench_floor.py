"""
The benchmarks' floor server (``bench/floor_server.py``) answers like the
agent's plain path: one whole 200 per request, however the requests are cut,
with a body of the asked size that the benchmark's client accepts.
"""

from __future__ import annotations

import json
from types import ModuleType

from twisted.internet.testing import StringTransport

from tests.rig.benchmods import load


def _floor() -> ModuleType:
    return load("floor_server")


def _responses(data: bytes) -> list[dict[str, object]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        out.append(json.loads(rest[:length]))
        data = rest[length:]
    return out


def test_each_request_gets_one_answer_however_the_bytes_are_cut() -> None:
    floor = _floor()
    floor.Floor.response = floor.answer(700)
    body = json.dumps({"action": "get_server_status", "serverId": "a", "payload": {}}).encode()
    request = (
        b"POST /api/command HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    stream = request * 3
    for cut in range(1, len(stream), 7):
        proto = floor.Floor()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(stream[:cut])
        proto.dataReceived(stream[cut:])
        answers = _responses(transport.value())
        assert len(answers) == 3
        assert all(a["success"] is True for a in answers)


def test_the_body_has_the_asked_size() -> None:
    floor = _floor()
    for size in (200, 700, 5000):
        (answer,) = _responses(floor.answer(size))
        assert len(json.dumps(answer, separators=(",", ":"))) == size


def test_an_endless_head_is_cut_off() -> None:
    floor = _floor()
    proto = floor.Floor()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"POST / HTTP/1.1\r\nX: " + b"y" * 70000)
    assert transport.disconnecting
