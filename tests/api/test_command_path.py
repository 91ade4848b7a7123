"""
The Panel's command endpoint as the listener serves it (``AgentApi.resource()``).

``POST /api/command`` is answered without Klein's routing, and a command the
domain answers at once (a status or metrics read) costs no timer, no shield
and no tracker entry.  These tests hold that path to Klein's answers, byte for
byte, and to the pipeline's guarantees (cancellation, shielding, errors).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from ctrlagent.api import GuardedChannel, GuardedSite
from ctrlagent.wire import json as wire_json
from ctrlagent.wire.command import Command
from tests.api.conftest import SECRET, ApiRig, panel_headers


@pytest.fixture(autouse=True)
def still_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """One wall-clock reading for both answers compared (``system.ping``'s timestamp)."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)


def _serve(rig: ApiRig, resource: IResource) -> tuple[GuardedChannel, StringTransport]:
    site = GuardedSite(
        resource, max_body_bytes=64 * 1024, clock=Clock(), authorize=rig.api.authorized
    )
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert isinstance(channel, GuardedChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _post(body: bytes, path: str = "/api/command", secret: str = SECRET) -> bytes:
    headers = {**panel_headers(secret), "Content-Length": str(len(body))}
    lines = ["POST {} HTTP/1.1".format(path), "Host: node.test"]
    lines += ["{}: {}".format(k, v) for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _rig_with_server() -> ApiRig:
    rig = ApiRig()
    created = rig.dispatcher.dispatch(
        Command("create_server", "s1", {"name": "one", "image": "img"})
    )
    assert created.called
    return rig


def _answer(use_fast_path: bool, request_bytes: bytes) -> bytes:
    """What a fresh API (one server ``s1``) writes for ``request_bytes`` (less its Date)."""
    rig = _rig_with_server()
    resource = rig.api.resource() if use_fast_path else rig.api.app.resource()
    channel, out = _serve(rig, resource)
    channel.dataReceived(request_bytes)
    return b"\r\n".join(
        line for line in out.value().split(b"\r\n") if not line.lower().startswith(b"date:")
    )


BODIES = [
    {"action": "get_server_status", "serverId": "s1"},
    {"action": "get_server_metrics", "serverId": "s1", "payload": {}},
    {"action": "get_server_status", "serverId": "nope"},
    {"action": "no_such_action"},
    {"action": "system.ping"},
    {"action": "get_server_status"},
    [1, 2],
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(b)[:40] for b in BODIES])
def test_the_command_endpoint_answers_as_klein_would(body: Any) -> None:
    request_bytes = _post(json.dumps(body).encode())
    fast = _answer(True, request_bytes)
    assert fast.startswith(b"HTTP/1.1 ")
    assert fast == _answer(False, request_bytes)


@pytest.mark.parametrize(
    "request_bytes",
    [
        _post(b"{not json"),
        _post(json.dumps({"action": "system.ping"}).encode(), secret="wrong"),
        _post(json.dumps({"action": "system.ping"}).encode(), path="/api/command/"),
        _post(json.dumps({"action": "system.ping"}).encode(), path="/api/command?x=1"),
        b"PUT /api/command HTTP/1.1\r\nHost: node.test\r\nContent-Length: 0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: node.test\r\n\r\n",
    ],
    ids=["bad-json", "wrong-secret", "trailing-slash", "query", "put", "health"],
)
def test_other_requests_and_refusals_are_answered_as_klein_would(request_bytes: bytes) -> None:
    fast = _answer(True, request_bytes)
    assert fast.startswith(b"HTTP/1.1 ")
    assert fast == _answer(False, request_bytes)


def test_the_command_endpoint_does_not_go_through_klein(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = _rig_with_server()
    routes = rig.api.app.resource()
    routed: list[bytes] = []
    original = routes.render

    def counting(request: Any) -> Any:
        routed.append(request.path)
        return original(request)

    monkeypatch.setattr(routes, "render", counting)
    monkeypatch.setattr(rig.api.app, "resource", lambda: routes)
    channel, out = _serve(rig, rig.api.resource())
    status = {"action": "get_server_status", "serverId": "s1"}
    channel.dataReceived(_post(json.dumps(status).encode()))
    assert b'"success":true' in out.value()
    assert routed == []
    out.clear()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: node.test\r\n\r\n")
    assert b"200 OK" in out.value()
    assert routed == [b"/health"]


def test_a_status_answer_sets_no_timer_and_holds_no_work() -> None:
    rig = _rig_with_server()
    channel, out = _serve(rig, rig.api.resource())
    before = list(rig.clock.getDelayedCalls())
    held: list[object] = []
    hold = rig.api._tracker.hold

    def counting(d: Any) -> Any:
        held.append(d)
        return hold(d)

    rig.api._tracker.hold = counting  # type: ignore[method-assign]
    for action in ("get_server_status", "get_server_metrics"):
        channel.dataReceived(_post(json.dumps({"action": action, "serverId": "s1"}).encode()))
    assert out.value().count(b'"success":true') == 2
    # No deadline timer (``answer_by``) was set, none is left, nothing was tracked.
    assert rig.clock.getDelayedCalls() == before
    assert held == []


def test_a_slow_command_is_still_bounded_and_shielded_from_a_client_that_leaves() -> None:
    rig = _rig_with_server()
    gate = rig.servers.hold("start")
    channel, out = _serve(rig, rig.api.resource())
    channel.dataReceived(_post(json.dumps({"action": "start_server", "serverId": "s1"}).encode()))
    assert out.value() == b""
    # The deadline is armed for the slow one, and the API holds its work.
    assert rig.clock.getDelayedCalls()
    assert rig.api.in_flight == 1
    channel.connectionLost(Failure(ConnectionError("client went away")))
    gate.callback(None)
    # The start went on although its client left, and nothing was written.
    assert rig.api.in_flight == 0
    assert rig.servers.status("s1").state in ("starting", "running")
    assert out.value() == b""


def test_a_slow_command_is_answered_once_it_finishes() -> None:
    rig = _rig_with_server()
    gate = rig.servers.hold("start")
    channel, out = _serve(rig, rig.api.resource())
    channel.dataReceived(_post(json.dumps({"action": "start_server", "serverId": "s1"}).encode()))
    assert out.value() == b""
    gate.callback(None)
    answer = json.loads(out.value().split(b"\r\n\r\n", 1)[1])
    assert answer["success"] is True
    assert rig.clock.getDelayedCalls() == []


def test_a_bug_in_the_command_route_is_a_logged_json_500(
    monkeypatch: pytest.MonkeyPatch, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    rig = ApiRig()

    def broken(body: bytes) -> Any:
        raise RuntimeError("/etc/shadow is at 0xdeadbeef")

    monkeypatch.setattr("ctrlagent.api.app.decode_body", broken)
    channel, out = _serve(rig, rig.api.resource())
    channel.dataReceived(_post(b"{}"))
    assert out.value().startswith(b"HTTP/1.1 500 ")
    assert b"shadow" not in out.value()
    assert json.loads(out.value().split(b"\r\n\r\n", 1)[1])["success"] is False
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


def test_a_body_with_few_brackets_is_not_scanned_byte_by_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scanned: list[bytes] = []
    original = wire_json.nesting_depth

    def counting(raw: bytes, limit: int = wire_json.MAX_BODY_DEPTH) -> int:
        scanned.append(raw)
        return original(raw, limit)

    monkeypatch.setattr(wire_json, "nesting_depth", counting)
    assert wire_json.decode_body(b'{"action": "get_server_status", "payload": {}}')
    assert scanned == []
    # Past 64 brackets the scan decides: deep is refused, wide is not.
    wide = ("[" + "[],".join("" for _ in range(80)) + "[]]").encode()
    assert wire_json.decode_body(wide)
    deep = b"[" * 65 + b"]" * 65
    with pytest.raises(Exception, match="nested deeper"):
        wire_json.decode_body(deep)
    assert scanned == [wide, deep]
