"""
The frames the agent sends on the WebSocket link (``wire.frames``, PROTOCOL.md
section 3): responses, heartbeats, pongs, status, console and resource events.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.errors import ServerNotFound
from ctrlagent.events import ResourceUpdate, StatusChanged
from ctrlagent.wire import frames as messages
from ctrlagent.wire.command import ActionResult
from ctrlagent.wire.json import encode
from ctrlagent.wire.time import iso_ms
from tests.wire.samples import NOW, json_values

# --- outgoing --------------------------------------------------------------------------------


def test_success_and_failure_responses_have_the_protocol_shape() -> None:
    ok = messages.response_success("c1", ActionResult({"serverId": "s"}, "started"), NOW)
    assert ok == {"id": "c1", "type": "response", "timestamp": "2026-11-24T01:00:53.257Z",
                  "success": True, "message": "started", "data": {"serverId": "s"}}
    bad = messages.response_for_error("c2", ServerNotFound("no server s"), NOW)
    assert bad["success"] is False
    assert bad["error"] == {"code": "SERVER_NOT_FOUND", "message": "no server s"}
    assert "data" not in bad


def test_heartbeat_and_pong_shapes() -> None:
    beat = messages.heartbeat("node-7", NOW)
    assert beat["type"] == "heartbeat"
    assert beat["data"] == {"nodeId": "node-7", "timestamp": beat["timestamp"], "status": "online"}
    answer = messages.pong("p1", NOW, active_servers=2, system_load={"cpu": 1.5, "memory": 40})
    assert answer["id"] == "p1"
    assert answer["data"] == {"agentStatus": "online", "activeServers": 2,
                              "systemLoad": {"cpu": 1.5, "memory": 40, "disk": 0}}


def test_status_change_becomes_event_and_legacy_frame() -> None:
    ev = StatusChanged("s1", "starting", "crashed", NOW, error="exit 1", container_id="c0ffee")
    event, legacy = messages.frames_for_status(ev)
    assert event["type"] == "event" and event["event"] == "server_status_changed"
    assert event["data"] == {"serverId": "s1", "previousStatus": "starting",
                             "currentStatus": "crashed", "status": "crashed",
                             "error": "exit 1", "containerId": "c0ffee"}
    assert legacy["type"] == "server_status"
    assert legacy["data"] == {"serverId": "s1", "status": "crashed"}
    assert messages.frames_for_status(ev, with_legacy=False) == [event]


def test_console_batch_carries_message_and_lines() -> None:
    lines = ["line {}".format(i) for i in range(3)]
    log, output = messages.console_frames("s1", "stdout", lines, NOW)
    assert log["event"] == "server_log"
    assert log["data"]["message"] == "line 0\nline 1\nline 2"
    assert log["data"]["lines"] == ["line 0", "line 1", "line 2"]
    assert log["data"]["stream"] == "stdout"
    assert log["data"]["timestamp"] == log["timestamp"] == iso_ms(NOW)
    assert output["type"] == "server_output"
    assert output["data"]["output"] == "line 0\nline 1\nline 2"


@given(st.dictionaries(st.sampled_from(["cpu", "memory", "disk", "network", "players", "x"]),
                       json_values, max_size=6))
def test_resource_update_always_has_network_and_integer_players(metrics: dict[str, Any]) -> None:
    frames = messages.resource_frames(ResourceUpdate("s", metrics), NOW, status="running")
    data = frames[0]["data"]
    assert set(data["network"]) == {"in", "out"}
    assert isinstance(data["players"], int)
    assert all(isinstance(data[k], float) for k in ("cpu", "memory", "disk"))
    assert frames[1]["data"]["status"] == "running"
    json.loads(encode(frames[0]))
