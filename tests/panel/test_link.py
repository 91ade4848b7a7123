"""
The Panel link's logic on a ``Clock``, over an in-memory connection to a real
Autobahn server playing the Panel: reconnect schedule, the connection sequence,
outbox, console batching, commands and pings.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ctrlagent import logs
from ctrlagent.events import ConsoleOutput, StatusChanged
from ctrlagent.panel.backoff import ReconnectBackoff, panel_url
from ctrlagent.panel.outbox import ConsoleBatcher, Outbox

from .harness import Harness


def types(frames: list[Any]) -> list[str]:
    return [f.get("event") or f["type"] for f in frames]


# --- URL and backoff ------------------------------------------------------------------------


def test_node_id_is_added_to_the_url_only_when_absent() -> None:
    assert panel_url("ws://p:8080", "n1") == "ws://p:8080/?nodeId=n1"
    assert panel_url("ws://p:8080/ws?a=b", "n1") == "ws://p:8080/ws?a=b&nodeId=n1"
    assert panel_url("wss://p/ws?nodeId=other", "n1") == "wss://p/ws?nodeId=other"
    assert panel_url("ws://p/ws?nodeId=", "n1") == "ws://p/ws?nodeId=n1"


def test_backoff_grows_exponentially_to_the_cap_and_jitter_only_lengthens() -> None:
    policy = ReconnectBackoff(1.0, 60.0, random=lambda: 0.0)
    assert [policy(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    jittery = ReconnectBackoff(1.0, 60.0, jitter=0.25, random=lambda: 0.999)
    assert 1.0 < jittery(1) < 1.25
    assert 60.0 < jittery(50) < 75.0


def test_backoff_counts_failed_handshakes_that_client_service_forgets() -> None:
    policy = ReconnectBackoff(1.0, 60.0, refused_floor=30.0, random=lambda: 0.0)
    delays = []
    for _ in range(4):
        policy.handshake_failed(refused=False)
        delays.append(policy(1))  # ClientService always says "first failure" after a TCP connect
    assert delays == [2, 4, 8, 16]
    policy.handshake_failed(refused=True)
    assert policy(1) == 32
    policy.stable()
    assert policy(1) == 1


def test_tcp_failures_back_off_on_the_clock() -> None:
    rig = Harness(backoff_initial=1.0, backoff_max=60.0)
    rig.endpoint.refuse = True
    rig.start()
    delays = []
    for _ in range(9):
        delay = rig.next_retry_delay()
        delays.append(delay)
        rig.advance(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert rig.endpoint.attempts == 10
    assert not rig.link.connected


def test_refused_handshakes_are_retried_slowly_on_the_clock() -> None:
    rig = Harness(agent_secret="wrong", refused_backoff=30.0, backoff_max=60.0)
    rig.start()
    delays = []
    for _ in range(7):
        delays.append(rig.next_retry_delay())
        rig.advance(delays[-1])
    # TCP connects every time, so ClientService alone would say 1 s forever.
    assert delays == [30, 30, 30, 30, 32, 60, 60]
    assert rig.panel.refusals == [401] * 8
    assert not rig.link.connected and rig.link.connections == 0


def test_a_panel_closing_1008_at_once_is_backed_off_like_a_failed_handshake() -> None:
    rig = Harness(node_ids={"some-other-node"})
    rig.start()
    delays = []
    for _ in range(4):
        delays.append(rig.next_retry_delay())
        rig.advance(delays[-1])
    assert delays == [2, 4, 8, 16]
    assert len(rig.panel.connections) == 5
    assert not rig.link.connected


def test_a_stable_session_resets_the_backoff() -> None:
    rig = Harness(stable_after=10.0)
    rig.endpoint.refuse = True
    rig.start()
    for _ in range(3):
        rig.advance(rig.next_retry_delay())
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    assert rig.link.connected
    rig.advance(11)
    rig.panel.drop()
    rig.flush()
    assert rig.next_retry_delay() == 1.0


# --- connection sequence --------------------------------------------------------------------


def test_handshake_carries_the_credentials_and_node_id() -> None:
    rig = Harness()
    rig.start()
    request = rig.panel.requests[0]
    assert request.headers["authorization"] == "Bearer " + rig.config.secret
    assert request.headers["x-node-id"] == "node-1"
    assert request.headers["x-agent-id"] == "node-1"
    assert request.params["nodeId"] == ["node-1"]
    assert request.path == "/ws"
    assert request.headers["user-agent"].startswith("ctrlagent/")


def test_connected_is_true_only_between_open_and_close() -> None:
    rig = Harness()
    assert not rig.link.connected and not rig.link.is_connected()
    rig.link.startService()
    assert not rig.link.connected  # TCP is up in memory, the upgrade is not done yet
    rig.flush()
    assert rig.link.connected and rig.link.is_connected()
    rig.panel.drop()
    rig.flush()
    assert not rig.link.connected and not rig.link.is_connected()


def test_disabled_link_reports_connected_and_never_dials() -> None:
    rig = Harness(enabled=False)
    rig.start()
    assert rig.link.is_connected() and not rig.link.connected
    assert rig.endpoint.attempts == 0


def test_open_sends_heartbeat_system_info_then_snapshot_and_answers_the_request() -> None:
    rig = Harness()
    rig.create_server("s1")  # the link listens from its construction on
    rig.start()
    frames = rig.panel.frames()
    assert types(frames) == [
        "heartbeat", "system_info",
        "server_status_changed", "server_status",  # queued before the start, as while down
        "server_status_changed", "server_status",  # the snapshot
        "system_info",
    ]
    assert frames[1]["data"] == {"os": "linux", "cpuCount": 2, "nodeId": "node-1"}
    assert frames[2]["data"]["previousStatus"] == "installing"
    assert frames[4]["data"] == {
        "serverId": "s1", "previousStatus": "offline", "currentStatus": "offline",
        "status": "offline", "containerId": frames[4]["data"]["containerId"],
    }


def test_heartbeat_every_interval_while_open_and_none_after_close() -> None:
    rig = Harness(heartbeat_interval=30.0)
    rig.start()
    for _ in range(3):
        rig.advance(30)
    beats = rig.panel.frames("heartbeat")
    assert len(beats) == 4
    assert beats[0]["data"]["nodeId"] == "node-1" and beats[0]["data"]["status"] == "online"
    rig.panel.drop()
    rig.flush()
    rig.endpoint.refuse = True
    rig.advance(90)
    assert len(rig.panel.frames("heartbeat")) == 4


def test_events_while_down_are_flushed_in_order_before_a_fresh_snapshot() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.start()
    rig.panel.drop()
    rig.flush()
    rig.servers.servers["s1"].status = "offline"
    d = rig.servers.start("s1")
    assert d.called  # starting -> running, plus a console line
    rig.advance(rig.next_retry_delay())
    second = rig.panel.frames(connection=1)
    assert types(second) == [
        "heartbeat", "system_info",
        "server_status_changed", "server_status",  # offline -> starting (queued)
        "server_status_changed", "server_status",  # starting -> running (queued)
        "server_log", "server_output",  # "[fake] server started" (queued)
        "server_status_changed", "server_status",  # the snapshot
        "system_info",
    ]
    snapshot = second[8]["data"]
    assert (snapshot["previousStatus"], snapshot["currentStatus"]) == ("running", "running")
    assert second[2]["data"]["currentStatus"] == "starting"


def test_outbox_drops_the_oldest_and_says_how_many() -> None:
    rig = Harness(outbox_size=3)
    rig.endpoint.refuse = True
    rig.start()
    for i in range(5):
        rig.link._on_event(StatusChanged("s1", "a{}".format(i), "b{}".format(i), float(i)))
    assert len(rig.link.outbox) == 3
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    frames = rig.panel.frames()
    dropped = rig.panel.frames("events_dropped")
    assert dropped[0]["data"] == {"nodeId": "node-1", "dropped": 2, "reasons": {"linkDown": 2}}
    changes = [f["data"]["currentStatus"] for f in rig.panel.frames("server_status_changed")]
    assert changes == ["b2", "b3", "b4"]
    assert types(frames).index("events_dropped") < types(frames).index("server_status_changed")
    assert rig.link.stats()["dropped"] == 2


def test_writes_go_to_the_outbox_while_the_transport_is_paused() -> None:
    rig = Harness()
    rig.start()
    protocol = rig.link._protocol
    assert protocol is not None
    rig.link.writes_paused(protocol)
    rig.link._on_event(StatusChanged("s1", "offline", "starting", 1.0))
    rig.flush()
    assert rig.panel.frames("server_status_changed") == []
    assert len(rig.link.outbox) == 1
    rig.link.writes_resumed(protocol)
    rig.flush()
    assert len(rig.panel.frames("server_status_changed")) == 1


# --- console batching -----------------------------------------------------------------------


def test_console_lines_are_batched_by_count_and_window() -> None:
    rig = Harness(console_batch_lines=50, console_batch_window=0.05)
    rig.start()
    for i in range(120):
        rig.link._on_event(ConsoleOutput("s1", "stdout", ["line {}".format(i)], 1.0))
    rig.flush()
    sizes = [len(f["data"]["lines"]) for f in rig.panel.frames("server_log")]
    assert sizes == [50, 50]
    rig.advance(0.05 * 1.5)  # the window and its slack (half a window)
    sizes = [len(f["data"]["lines"]) for f in rig.panel.frames("server_log")]
    assert sizes == [50, 50, 20]
    assert rig.panel.console_lines() == ["line {}".format(i) for i in range(120)]
    assert len(rig.panel.frames("server_output")) == 3


def test_a_large_event_is_cut_into_frames_stamped_by_their_first_line() -> None:
    delivered: list[tuple[str, list[str], float]] = []

    def deliver(
        server_id: str, stream: str, lines: list[str], timestamp: float, receipts: Any
    ) -> None:
        delivered.append((stream, lines, timestamp))

    clock = Clock()
    batcher = ConsoleBatcher(clock, 4, 1.0, deliver)
    batcher.add(ConsoleOutput("a", "stdout", ["1", "2", "3"], 10.0))
    batcher.add(ConsoleOutput("a", "stdout", [str(i) for i in range(4, 12)], 20.0))
    # 11 lines: two full frames now, the rest waits for the window.
    assert delivered == [("stdout", ["1", "2", "3", "4"], 10.0),
                         ("stdout", ["5", "6", "7", "8"], 20.0)]
    batcher.add(ConsoleOutput("a", "stdout", ["12"], 30.0))
    assert len(delivered) == 3 and delivered[2] == ("stdout", ["9", "10", "11", "12"], 20.0)
    batcher.add(ConsoleOutput("a", "stdout", ["13"], 40.0))
    clock.advance(1.0)
    assert delivered[3:] == [("stdout", ["13"], 40.0)]
    assert not clock.getDelayedCalls()


def test_every_servers_batch_goes_out_when_its_own_window_ends_on_one_timer() -> None:
    delivered: list[tuple[str, list[str], float]] = []
    clock = Clock()
    batcher = ConsoleBatcher(
        clock, 100, 1.0,
        lambda sid, stream, lines, ts, receipts: delivered.append((sid, lines, clock.seconds())),
    )
    for n in range(300):  # servers printing at different moments
        clock.advance(0.01)
        batcher.add(ConsoleOutput("s{}".format(n % 30), "stdout", [str(n)], clock.seconds()))
        # one timer for every pending batch, never one per server or line
        assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert not clock.getDelayedCalls()
    assert sorted(int(line) for _, lines, _ in delivered for line in lines) == list(range(300))
    for sid, lines, at in delivered:
        # each batch left when its first line's window was over, not later
        due = (int(lines[0]) + 1) * 0.01 + 1.0
        assert at >= due - 1e-6
        assert at <= due + 0.011 or (due > 3.0 and at == pytest.approx(4.0))
        assert all(int(line) % 30 == int(sid[1:]) for line in lines)
    # a server flushed early (a status change) leaves the others' windows alone
    batcher.add(ConsoleOutput("a", "stdout", ["x"], clock.seconds()))
    clock.advance(0.5)
    batcher.add(ConsoleOutput("b", "stdout", ["y"], clock.seconds()))
    batcher.flush("a")
    assert delivered[-1][:2] == ("a", ["x"])
    clock.advance(0.9)
    assert delivered[-1][:2] == ("a", ["x"])
    clock.advance(0.1)
    assert delivered[-1][:2] == ("b", ["y"])
    assert not clock.getDelayedCalls()


def test_batches_due_within_the_slack_leave_together_never_before_their_window() -> None:
    delivered: list[tuple[str, float]] = []
    clock = Clock()
    batcher = ConsoleBatcher(
        clock, 100, 1.0,
        lambda sid, stream, lines, ts, receipts: delivered.append((sid, clock.seconds())),
        slack=0.5,
    )
    fired: list[float] = []
    expire = batcher._expire

    def counted() -> None:
        fired.append(clock.seconds())
        expire()

    batcher._expire = counted  # type: ignore[method-assign]
    for n in range(100):  # 100 servers, a line each, 0.02 s apart
        batcher.add(ConsoleOutput("s{}".format(n), "stdout", ["x"], clock.seconds()))
        clock.advance(0.02)
    for _ in range(200):
        clock.advance(0.01)
    assert sorted(sid for sid, _ in delivered) == sorted("s{}".format(n) for n in range(100))
    for sid, at in delivered:
        began = int(sid[1:]) * 0.02
        assert began + 1.0 - 1e-6 <= at <= began + 1.5 + 0.011  # (the clock's 0.01 steps)
    # 2 s of first lines, due within half a second of each other: four wakes
    assert len(fired) == 4
    assert not clock.getDelayedCalls()


def test_without_a_window_every_event_goes_out_at_once_in_bounded_frames() -> None:
    delivered: list[list[str]] = []
    clock = Clock()
    batcher = ConsoleBatcher(
        clock, 2, 0.0, lambda sid, stream, lines, ts, receipts: delivered.append(lines)
    )
    batcher.add(ConsoleOutput("a", "stdout", ["1", "2", "3", "4", "5"], 1.0))
    assert delivered == [["1", "2"], ["3", "4"], ["5"]]
    assert not clock.getDelayedCalls()


def test_a_stream_change_or_status_change_flushes_the_batch_first() -> None:
    delivered: list[tuple[str, str, list[str]]] = []

    def deliver(
        server_id: str, stream: str, lines: list[str], timestamp: float, receipts: Any
    ) -> None:
        delivered.append((server_id, stream, lines))

    batcher = ConsoleBatcher(Clock(), 10, 1.0, deliver)
    batcher.add(ConsoleOutput("a", "stdout", ["1"], 0))
    batcher.add(ConsoleOutput("a", "stderr", ["2"], 0))
    batcher.add(ConsoleOutput("b", "stdout", ["3"], 0))
    assert delivered == [("a", "stdout", ["1"])]
    batcher.flush_all()
    assert delivered[1:] == [("a", "stderr", ["2"]), ("b", "stdout", ["3"])]

    rig = Harness(console_batch_window=5.0)
    rig.start()
    rig.link._on_event(ConsoleOutput("s1", "stdout", ["Segmentation fault"], 1.0))
    rig.link._on_event(StatusChanged("s1", "running", "crashed", 2.0))
    rig.flush()
    kinds = types(rig.panel.frames())
    assert kinds.index("server_log") < kinds.index("server_status_changed", 3)


def test_outbox_counts_what_it_drops() -> None:
    box = Outbox(2)
    assert not box.append((b"1",))
    assert not box.append((b"2",))
    assert box.append((b"3",))
    assert [box.popleft(), box.popleft()] == [(b"2",), (b"3",)]
    assert box.take_dropped() == 1 and box.take_dropped() == 0


# --- commands and pings ---------------------------------------------------------------------


def test_flat_nested_and_legacy_commands_are_answered_once_with_their_ids() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.start()
    rig.panel.send({"id": "flat", "type": "command", "action": "get_server_status",
                    "serverId": "s1", "payload": {}, "timestamp": 1795482053257})
    rig.panel.send({"id": "nested", "type": "command",
                    "data": {"action": "start_server", "serverId": "s1"}})
    rig.panel.send({"id": "legacy", "type": "server_power",
                    "data": {"serverId": "s1", "action": "kill"}})
    rig.panel.send({"id": "nope", "type": "command", "action": "launch_rockets"})
    rig.panel.send({"id": "ghost", "type": "command", "action": "start_server", "serverId": "zz"})
    rig.panel.send({"id": "bad", "type": "command", "serverId": "s1"})
    rig.flush()
    responses = rig.panel.responses()
    assert sorted(responses) == ["bad", "flat", "ghost", "legacy", "nested", "nope"]
    assert all(len(v) == 1 for v in responses.values())
    assert responses["flat"][0]["data"]["serverId"] == "s1"
    assert responses["nested"][0]["success"] is True
    assert responses["legacy"][0]["success"] is True
    assert rig.servers.servers["s1"].status == "offline"  # started, then killed
    assert responses["nope"][0]["error"]["code"] == "UNKNOWN_ACTION"
    assert responses["ghost"][0]["error"]["code"] == "SERVER_NOT_FOUND"
    assert responses["bad"][0]["error"]["code"] == "INVALID_PAYLOAD"
    assert rig.link.connected


def test_a_command_in_flight_across_a_disconnect_is_answered_on_the_next_connection() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.servers.servers["s1"].status = "running"
    rig.start()
    gate = rig.servers.hold("stop")
    rig.panel.send({"id": "slow-stop", "type": "command", "action": "stop_server",
                    "serverId": "s1", "payload": {"timeout": 30}})
    rig.panel.send({"id": "slow-stop", "type": "command", "action": "stop_server",
                    "serverId": "s1", "payload": {"timeout": 30}})  # a retransmission
    rig.flush()
    rig.panel.drop()
    rig.flush()
    gate.callback(None)
    assert rig.panel.responses() == {}
    rig.advance(rig.next_retry_delay())
    responses = rig.panel.responses()
    assert list(responses) == ["slow-stop"] and len(responses["slow-stop"]) == 1
    assert responses["slow-stop"][0]["success"] is True
    assert rig.panel.frames("response", connection=1)


def test_commands_past_the_configured_in_flight_bound_wait_their_turn() -> None:
    """``panel.max_in_flight`` bounds the commands handled at once; the rest wait, in order."""
    rig = Harness(max_in_flight=1)
    assert rig.link.max_in_flight == 1
    assert rig.link.max_held_bytes == rig.config.panel.max_held_bytes
    rig.create_server("s1")
    rig.create_server("s2")
    rig.servers.servers["s1"].status = "running"
    rig.start()
    gate = rig.servers.hold("stop")
    rig.panel.send({"id": "stop", "type": "command", "action": "stop_server",
                    "serverId": "s1", "payload": {"timeout": 30}})
    rig.panel.send({"id": "status", "type": "command", "action": "get_server_status",
                    "serverId": "s2", "payload": {}})
    rig.flush()
    assert rig.panel.responses() == {}  # the status waits behind the held stop
    gate.callback(None)
    rig.flush()
    assert list(rig.panel.responses()) == ["stop", "status"]


def test_a_dispatcher_bug_is_answered_as_execution_error(fail_on_logged_errors: list) -> None:
    rig = Harness()
    rig.start()

    def broken(command: Any) -> Any:
        raise RuntimeError("boom")

    rig.link._dispatcher = type("Broken", (), {"dispatch": staticmethod(broken)})()
    rig.panel.send({"id": "x", "type": "command", "action": "list_servers"})
    rig.flush()
    assert rig.panel.responses()["x"][0]["error"]["code"] == "EXECUTION_ERROR"
    assert len(fail_on_logged_errors) == 1  # a bug is logged loudly ...
    fail_on_logged_errors.clear()  # ... and that is what this test expects


def test_ping_is_answered_with_a_pong_echoing_the_id() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.servers.servers["s1"].status = "running"
    rig.start()
    rig.panel.send({"type": "ping", "id": "p-1", "timestamp": "2026-11-24T02:20:30Z"})
    rig.flush()
    (pong,) = rig.panel.frames("pong")
    assert pong["id"] == "p-1"
    assert pong["data"] == {"agentStatus": "online", "activeServers": 1,
                            "systemLoad": {"cpu": 7.0, "memory": 30.0, "disk": 20.0}}


def test_a_failing_host_view_still_answers_ping_and_system_info_with_a_warning() -> None:
    from twisted.internet.defer import fail
    from twisted.logger import LogLevel, globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rig = Harness()
        rig._load = lambda: fail(OSError("no /proc"))  # type: ignore[method-assign]
        rig._system_info = lambda: fail(OSError("no /proc"))  # type: ignore[method-assign]
        rig.link._load = rig._load
        rig.link._system_info = rig._system_info
        rig.start()
        rig.panel.send({"type": "ping", "id": "p-2"})
        rig.flush()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    (pong,) = rig.panel.frames("pong")
    assert pong["id"] == "p-2"
    assert pong["data"]["systemLoad"] == {"cpu": 0.0, "memory": 0.0, "disk": 0.0}
    assert rig.panel.frames("system_info")  # sent on connect, from what is known
    warned = [e for e in seen if e.get("log_level") is LogLevel.warn and "no /proc" in
              str(e.get("error", ""))]
    assert {e["what"] for e in warned} == {
        "gather system information", "measure the system load for a pong"}


@pytest.mark.parametrize("payload", [
    b"not json", b"[1,2,3]", b"42", b'"text"', b"null", b"\xff\xfe",
    json.dumps({"type": "console", "data": {"line": "x"}}).encode(),
    json.dumps({"type": "stats"}).encode(),
    json.dumps({"type": "command"}).encode(),
])
def test_frames_the_agent_does_not_understand_never_close_the_link(payload: bytes) -> None:
    rig = Harness()
    rig.start()
    assert rig.panel.current is not None
    if payload == b"\xff\xfe":
        rig.panel.current.sendMessage(payload, isBinary=True)
    else:
        rig.panel.send(payload)
    rig.flush()
    assert rig.link.connected
    assert rig.panel.responses() == {}


def test_stop_service_closes_cleanly_and_stops_the_heartbeat() -> None:
    rig = Harness()
    rig.start()
    d = rig.link.stopService()
    rig.flush()
    assert d.called
    assert not rig.link.connected
    beats = len(rig.panel.frames("heartbeat"))
    rig.advance(120)
    assert len(rig.panel.frames("heartbeat")) == beats
    assert rig.endpoint.attempts == 1


def test_system_info_and_load_may_be_coroutines_as_system_info_provides() -> None:
    rig = Harness()

    async def info() -> dict[str, Any]:
        return {"os": "linux", "dockerVersion": "20.10"}

    async def load() -> dict[str, Any]:
        # SystemInfo.snapshot()'s shape also works: percents are taken from it.
        return {"cpu": 3.5, "memory": {"total": 8, "used": 2, "percent": 25.0},
                "disk": {"percent": 50.0}}

    rig.link._system_info = info
    rig.link._load = load
    rig.start()
    rig.panel.send({"type": "ping", "id": 1})
    rig.flush()
    assert rig.panel.frames("system_info")[0]["data"]["dockerVersion"] == "20.10"
    assert rig.panel.frames("pong")[0]["data"]["systemLoad"] == {
        "cpu": 3.5, "memory": 25.0, "disk": 50.0}


def test_a_hanging_system_info_delays_the_queue_but_never_blocks_the_link() -> None:
    from twisted.internet.defer import Deferred

    rig = Harness()
    rig.link._system_info = lambda: Deferred()
    rig.create_server("s1")
    rig.endpoint.refuse = True
    rig.start()
    rig.link._on_event(StatusChanged("s1", "offline", "starting", 1.0))
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    assert types(rig.panel.frames()) == ["heartbeat"]  # everything else waits for system_info
    rig.advance(5.0)
    kinds = types(rig.panel.frames())
    assert kinds[:4] == ["heartbeat", "system_info", "server_status_changed", "server_status"]
    assert rig.panel.frames("system_info")[0]["data"] == {"nodeId": "node-1"}
    assert rig.link.connected


def test_while_the_close_handshake_runs_events_queue_and_nothing_is_sent() -> None:
    rig = Harness(heartbeat_interval=1.0)
    rig.start()
    protocol = rig.link._protocol
    assert protocol is not None
    protocol.sendClose(1000, "going")  # closing, but onClose has not happened yet
    rig.link._on_event(StatusChanged("s1", "offline", "starting", 1.0))
    rig.clock.advance(1.0)  # a heartbeat falls due: must not raise on a closing protocol
    rig.panel.send({"type": "ping", "id": "late"})
    assert len(rig.link.outbox) == 1
    rig.flush()
    assert not rig.link.connected
    rig.advance(rig.next_retry_delay())
    assert [f["data"]["currentStatus"] for f in rig.panel.frames("server_status_changed")] == [
        "starting"
    ]


# --- ids, undecodable frames, legacy failures ----------------------------------------------


def test_ids_are_echoed_with_their_json_type_and_bad_ones_are_refused_as_sent() -> None:
    rig = Harness()
    rig.start()
    for frame_id in ("text", 7, 1.5, "\ud800", True, None, [1], {"k": 2}, 2**60):
        rig.panel.send(json.dumps({"id": frame_id, "type": "command", "action": "system.ping"}))
    rig.panel.send('{"id":1e999,"type":"command","action":"system.ping"}')
    rig.flush()
    answers = [(r.frame["id"], r.frame, r.raw) for r in rig.panel.received
               if r.frame.get("type") == "response"]
    by_id = {json.dumps(frame_id): frame for frame_id, frame, _ in answers}
    assert len(answers) == len(by_id) == 9  # the null id asked for no answer
    for frame_id in ("text", 7, 1.5, "\ud800"):
        assert by_id[json.dumps(frame_id)]["success"] is True
    assert type(by_id["7"]["id"]) is int and type(by_id["1.5"]["id"]) is float
    for frame_id in (True, [1], {"k": 2}, 2**60, float("inf")):
        error = by_id[json.dumps(frame_id)]["error"]
        assert error["code"] == "INVALID_PAYLOAD", frame_id
    # The lone surrogate goes back escaped, in valid UTF-8; 1e999 as it came.
    raw = {json.dumps(frame_id): raw for frame_id, _, raw in answers}
    assert raw[json.dumps("\ud800")].startswith(b'{"id":"\\ud800"')
    raw[json.dumps("\ud800")].decode("utf-8")
    assert raw["Infinity"].startswith(b'{"id":1e999,')
    assert rig.link.connected


@pytest.mark.parametrize(("payload", "binary", "expected_id", "code"), [
    ('{"id":"deep","type":"command","action":"x","payload":{"a":' + "[" * 1000 + "]" * 1000
     + "}}", False, "deep", "PARSE_ERROR"),
    ('{"type":"command","data":{"id":"inner","action":"x","a":' + "[" * 100_000, False, "inner",
     "PARSE_ERROR"),
    ("[" * 100_000, False, None, "PARSE_ERROR"),
    (b'{"id":"bad-utf8","type":"command","action":"x","payload":{"p":"\xff\xfe"}}', False,
     "bad-utf8", "PARSE_ERROR"),
    (b"\x00\xff binary garbage", True, None, "PARSE_ERROR"),
    ('{"id":"cut","type":"command","action":"x"', False, None, "PARSE_ERROR"),
    ('{"id":"big","action":"create_server","serverId":"n","payload":{"image":"i","limits":'
     '{"cpu":1e999}}}', False, "big", "INVALID_PAYLOAD"),
    ('{"id":"nan","action":"create_server","serverId":"n","payload":{"image":"i","limits":'
     '{"cpu":NaN}}}', False, "nan", "INVALID_PAYLOAD"),
    ('{"id":"digits","action":"list_files","serverId":"n","payload":{"limit":' + "9" * 5000
     + "}}", False, "digits", "INVALID_PAYLOAD"),
])
def test_frames_that_cannot_be_decoded_or_used_are_answered_and_the_link_stays_up(
    payload: str | bytes, binary: bool, expected_id: str | None, code: str
) -> None:
    rig = Harness()
    rig.start()
    rig.panel.send(payload, binary=binary)
    rig.flush()
    if expected_id is None:
        (answer,) = rig.panel.frames("error")
        assert answer["data"]["code"] == code
        assert rig.panel.responses() == {}
    else:
        assert list(rig.panel.responses()) == [expected_id]
        (answer,) = rig.panel.responses()[expected_id]
        assert answer["success"] is False
    assert answer["error"]["code"] == code
    if code == "INVALID_PAYLOAD":
        assert answer["error"]["message"].split()[0] in ("limits.cpu", "limit")
    assert rig.link.connected
    rig.panel.send({"id": "after", "type": "command", "action": "system.ping"})
    rig.flush()
    assert rig.panel.responses()["after"][0]["success"] is True


def test_a_binary_frame_holding_a_json_command_is_answered_like_text() -> None:
    rig = Harness()
    rig.start()
    rig.panel.send(b'{"id":"b","type":"command","action":"system.ping"}', binary=True)
    rig.flush()
    assert rig.panel.responses()["b"][0]["success"] is True


def test_link_state_names_its_state_its_last_error_and_when_it_began() -> None:
    rig = Harness(agent_secret="wrong", refused_backoff=30.0)
    state = rig.link.state()
    assert (state["enabled"], state["connected"], state["state"]) == (True, False, "connecting")
    # The query may carry a token; /health shows the URL without it.
    assert state["url"] == "ws://panel.test:8080/ws"
    rig.endpoint.refuse = True
    rig.start()
    state = rig.link.state()
    assert (state["state"], state["connected"]) == ("disconnected", False)
    assert state["lastError"].startswith("could not connect: ") and "refuses" in state["lastError"]
    since = state["since"]
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    state = rig.link.state()
    assert state["lastError"] == "the Panel refused the handshake with HTTP 401"
    assert (state["state"], state["since"]) == ("disconnected", since)  # still the same outage
    good = Harness()
    good.clock.advance(100)
    good.start()
    state = good.link.state()
    assert (state["state"], state["connected"], state["lastError"]) == ("connected", True, None)
    assert state["since"] == "1970-01-01T00:01:40.000Z"
    good.advance(5)
    good.panel.drop()
    good.flush()
    state = good.link.state()
    assert (state["state"], state["since"]) == ("disconnected", "1970-01-01T00:01:45.000Z")
    assert state["lastError"].startswith("closed with code ")


def test_a_link_without_a_url_is_disabled_and_never_dials() -> None:
    rig = Harness(url="")
    rig.start()
    assert rig.endpoint.attempts == 0
    assert rig.link.state() == {"enabled": False, "connected": False, "state": "disabled",
                                "url": None, "lastError": None, "since": None}
    assert rig.link.is_connected()


def test_an_alias_is_recorded_over_the_link_and_a_conflict_refused() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.create_server("s2")
    rig.start()
    rig.panel.send({"id": "a1", "type": "command", "action": "add_server_alias",
                    "serverId": "s1", "payload": {"alias": "cuid-1"}})
    rig.panel.send({"id": "a2", "type": "command", "data": {"action": "add_alias",
                                                            "serverId": "s2", "alias": "cuid-1"}})
    rig.flush()
    rig.panel.send({"id": "a3", "type": "command", "action": "get_server_status",
                    "serverId": "cuid-1"})
    rig.flush()
    responses = rig.panel.responses()
    assert responses["a1"][0]["data"]["aliases"] == ["cuid-1"]
    assert responses["a2"][0]["error"]["code"] == "CONFLICT"
    assert responses["a3"][0]["data"]["serverId"] == "s1"


def test_legacy_frames_that_fail_are_answered_with_their_id_or_an_error_frame() -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.start()
    rig.panel.send({"type": "server_start", "requestId": "r1", "data": {"serverId": "ghost"}})
    rig.panel.send({"type": "server_power", "messageId": 5,
                    "data": {"serverId": "s1", "action": "explode"}})
    rig.panel.send({"type": "file_read", "requestId": "r2", "data": "not an object"})
    rig.panel.send({"type": "server_start", "data": {"serverId": "ghost"}})
    rig.panel.send({"type": "file_write", "data": ["not", "an", "object"]})
    rig.panel.send({"type": "server_stop", "data": {"serverId": "s1"}})  # works: no answer
    rig.flush()
    responses = rig.panel.responses()
    assert sorted(responses, key=str) == ["5", "r1", "r2"]
    r1 = responses["r1"][0]
    assert (r1["requestId"], r1["error"]["code"]) == ("r1", "SERVER_NOT_FOUND")
    five = responses["5"][0]
    assert (five["id"], five["messageId"], five["error"]["code"]) == (5, 5, "INVALID_PAYLOAD")
    assert responses["r2"][0]["error"]["code"] == "INVALID_PAYLOAD"
    errors = [f["data"] for f in rig.panel.frames("error")]
    assert errors == [
        {"code": "SERVER_NOT_FOUND", "message": errors[0]["message"], "action": "start_server",
         "serverId": "ghost", "frameType": "server_start"},
        {"code": "INVALID_PAYLOAD", "message": "data must be an object", "frameType": "file_write"},
    ]
    assert rig.link.connected


# --- back-pressure --------------------------------------------------------------------------


class GatedDispatcher:
    """Answers each command only when the test fires its gate."""

    def __init__(self) -> None:
        self.gates: list[tuple[str, Deferred[Any]]] = []

    def dispatch(self, command: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.gates.append((command.command_id, d))
        return d

    def release_first(self) -> None:
        _, d = self.gates.pop(0)
        d.callback({"ok": True})


def spy_on_reading(rig: Harness) -> list[str]:
    """Record the link's pause/resume calls on its transport."""
    calls: list[str] = []
    protocol = rig.link._protocol
    assert protocol is not None
    transport: Any = protocol.transport
    transport.pauseProducing = lambda: calls.append("pause")
    transport.resumeProducing = lambda: calls.append("resume")
    return calls


def test_commands_beyond_the_cap_wait_and_reading_pauses_until_answers_drain() -> None:
    rig = Harness()
    rig.link.max_in_flight = 3
    rig.link.max_held_bytes = 4 * 120  # about four small frames
    gated = rig.link._dispatcher = GatedDispatcher()
    rig.start()
    reading = spy_on_reading(rig)
    for i in range(20):
        rig.panel.send({"id": "c{}".format(i), "type": "command", "action": "list_servers"})
    rig.flush()
    assert [command_id for command_id, _ in gated.gates] == ["c0", "c1", "c2"]
    stats = rig.link.stats()
    assert (stats["commandsInFlight"], stats["framesHeld"]) == (3, 17)
    assert stats["readingPaused"] and reading == ["pause"]
    most = 0
    for _ in range(100):
        if not gated.gates:
            break
        most = max(most, len(gated.gates))
        gated.release_first()
        rig.flush()
    assert most == 3
    answered = [f["id"] for f in rig.panel.frames("response")]
    assert answered == ["c{}".format(i) for i in range(20)]  # each once, in order
    assert reading == ["pause", "resume"]
    stats = rig.link.stats()
    assert (stats["commandsInFlight"], stats["framesHeld"], stats["readingPaused"]) == (
        0, 0, False)


def test_answers_wait_for_a_panel_that_is_not_reading_and_only_events_are_dropped() -> None:
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        rig = Harness(outbox_size=2, legacy_frames=False)
        rig.link.max_in_flight = 4
        rig.start()
        protocol = rig.link._protocol
        assert protocol is not None
        rig.link.writes_paused(protocol)  # the Panel stops reading
        for i in range(10):
            rig.panel.send({"id": i, "type": "command", "action": "system.ping"})
        for i in range(5):
            rig.link._on_event(StatusChanged("s1", "a", str(i), float(i)))
        rig.flush()
        assert rig.panel.responses() == {}
        stats = rig.link.stats()
        assert (stats["answersQueued"], stats["commandsInFlight"], stats["framesHeld"]) == (
            4, 4, 6)
        rig.link.writes_resumed(protocol)
        rig.flush()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert sorted(rig.panel.responses(), key=int) == [str(i) for i in range(10)]
    assert all(len(v) == 1 for v in rig.panel.responses().values())
    (dropped,) = rig.panel.frames("events_dropped")
    assert dropped["data"]["dropped"] == 3
    assert dropped["data"]["reasons"] == {"panelNotReading": 3}
    assert any("the Panel is not reading" in w for w in warnings), warnings
    assert not any("link is down" in w for w in warnings), warnings


def test_frames_held_when_the_link_drops_are_still_answered_on_the_next_connection() -> None:
    rig = Harness()
    rig.link.max_in_flight = 1
    gated = rig.link._dispatcher = GatedDispatcher()
    rig.start()
    for i in range(3):
        rig.panel.send({"id": "h{}".format(i), "type": "command", "action": "list_servers"})
    rig.flush()
    assert len(gated.gates) == 1
    rig.panel.drop()
    rig.flush()
    gated.release_first()  # answered while down: the answer waits, and holds its slot
    stats = rig.link.stats()
    assert (stats["answersQueued"], stats["commandsInFlight"], stats["framesHeld"]) == (1, 1, 2)
    rig.advance(rig.next_retry_delay())
    for _ in range(2):
        gated.release_first()
        rig.flush()
    assert [f["id"] for f in rig.panel.frames("response", connection=1)] == ["h0", "h1", "h2"]
    assert rig.panel.frames("response", connection=0) == []


def test_untrusted_text_never_breaks_the_text_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # What twistd's stdout is under a strict UTF-8 locale.
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    observer = logs.text_observer()
    observer({"log_format": "unusable frame {command_id}", "command_id": "a\ud800",
              "log_level": LogLevel.warn, "log_time": 0.0, "log_namespace": "test"})
    assert b"unusable frame a\\ud800" in out.buffer.getvalue()  # type: ignore[attr-defined]


def test_a_pong_waiting_for_the_socket_keeps_its_slot_like_any_answer() -> None:
    rig = Harness()
    rig.link.max_in_flight = 1
    rig.start()
    protocol = rig.link._protocol
    assert protocol is not None
    rig.link.writes_paused(protocol)
    rig.panel.send({"type": "ping", "id": "p"})
    rig.panel.send({"id": "after-ping", "type": "command", "action": "system.ping"})
    rig.flush()
    stats = rig.link.stats()
    assert (stats["answersQueued"], stats["commandsInFlight"], stats["framesHeld"]) == (1, 1, 1)
    rig.link.writes_resumed(protocol)
    rig.flush()
    assert [f["id"] for f in rig.panel.frames("pong")] == ["p"]
    assert list(rig.panel.responses()) == ["after-ping"]


# --- backup events ----------------------------------------------------------------------------


class BackupEvents:
    """The backup manager's listener registry (``add_listener``/``remove_listener``)."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def emit(self, event: Any) -> None:
        for listener in list(self.listeners):
            listener(event)


def test_backup_progress_and_status_reach_the_panel_as_event_frames() -> None:
    from ctrlagent.events import BackupProgress, BackupStatusChanged

    source = BackupEvents()
    rig = Harness(backups=source)
    rig.start()
    rig.clock.advance(1_700_000_000)
    assert len(source.listeners) == 1
    source.emit(BackupStatusChanged("s1", "b1", "backup", "running"))
    source.emit(BackupProgress("s1", "b1", "backup", 512, 3, 1024, 50.0))
    source.emit(BackupStatusChanged("s1", "b1", "backup", "completed", size=900,
                                    checksum="ab" * 32))
    source.emit(BackupStatusChanged("s1", "b1", "restore", "failed", error="disk full"))
    rig.flush()
    frames = [f for f in rig.panel.frames() if str(f.get("event", "")).startswith("backup_")]
    assert [(f["type"], f["event"]) for f in frames] == [
        ("event", "backup_status_changed"), ("event", "backup_progress"),
        ("event", "backup_status_changed"), ("event", "backup_status_changed")]
    assert frames[1]["data"] == {"serverId": "s1", "backupId": "b1", "operation": "backup",
                                 "bytes": 512, "files": 3, "totalBytes": 1024, "percent": 50.0}
    assert frames[2]["data"] == {"serverId": "s1", "backupId": "b1", "operation": "backup",
                                 "status": "completed", "size": 900, "checksum": "ab" * 32}
    assert frames[3]["data"]["error"] == "disk full"
    assert frames[3]["data"]["operation"] == "restore"
    assert frames[0]["timestamp"].startswith("2023-11-14T22:13:20")
    # Stopping the link unsubscribes it from the backups too.
    rig.link.stopService()
    rig.flush()
    assert source.listeners == []
