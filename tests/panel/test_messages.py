"""
The pure frame layer of the Panel link: parsing what the Panel sends and
building what the agent sends (PROTOCOL.md section 3).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.commands import ActionResult
from ctrlagent.errors import ServerNotFound
from ctrlagent.events import ResourceUpdate, StatusChanged
from ctrlagent.panel import messages
from ctrlagent.panel.messages import (
    CommandFrame,
    Ignored,
    InvalidCommand,
    PingFrame,
    SystemInfoRequest,
    parse_frame,
)

NOW = 1_795_482_053.257

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
odd_timestamps = (
    st.none()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=30)
    | st.datetimes().map(lambda d: d.isoformat())
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
    | st.just("2026-11-24T02:20:30.123Z")
)
ids = st.text(min_size=1, max_size=30) | st.integers(min_value=0, max_value=10**15)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- incoming --------------------------------------------------------------------------------


def test_flat_command_is_parsed_with_id_server_and_payload() -> None:
    frame = {
        "id": "cmd_1795482053257_nmh13jlm9",
        "type": "command",
        "timestamp": "2026-11-24T02:20:30.123Z",
        "agentId": "node-1",
        "action": "stop_server",
        "serverId": "abc",
        "payload": {"signal": "SIGKILL", "timeout": 5},
    }
    message = parse_frame(dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.legacy is None
    command = message.command
    assert command.command_id == "cmd_1795482053257_nmh13jlm9"
    assert command.action == "stop_server"
    assert command.server_id == "abc"
    assert command.params == {"signal": "SIGKILL", "timeout": 5}


def test_nested_command_fields_are_lifted_out_of_data() -> None:
    frame = {
        "id": "n1",
        "type": "command",
        "data": {"action": "write_file", "serverId": "s1", "path": "a.txt", "content": "hi"},
    }
    message = parse_frame(json.dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.command.action == "write_file"
    assert message.command.server_id == "s1"
    assert message.command.params == {"path": "a.txt", "content": "hi"}
    assert message.command.command_id == "n1"


def test_nested_command_with_payload_inside_data() -> None:
    frame = {"type": "command", "data": {"id": 7, "action": "list_files", "serverId": "s",
                                         "payload": {"path": "/"}}}
    message = parse_frame(dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.command.command_id == "7"
    assert message.command.params == {"path": "/"}


def test_command_without_action_is_invalid_and_keeps_its_id() -> None:
    message = parse_frame(dumps({"id": "x1", "type": "command", "serverId": "s"}))
    assert isinstance(message, InvalidCommand)
    assert message.command_id == "x1"
    assert message.error.code == "INVALID_PAYLOAD"


def test_legacy_typed_frames_map_onto_section_2_actions() -> None:
    expected = {
        "server_create": "create_server",
        "server_start": "start_server",
        "server_stop": "stop_server",
        "server_restart": "restart_server",
        "server_delete": "delete_server",
        "server_command": "send_server_command",
        "file_read": "read_file",
        "file_write": "write_file",
        "server_update": "update_server",
        "server_suspend": "suspend_server",
        "server_unsuspend": "unsuspend_server",
        "server_reinstall": "reinstall_server",
    }
    for frame_type, action in expected.items():
        message = parse_frame(dumps({"type": frame_type, "data": {"serverId": "s9", "x": 1}}))
        assert isinstance(message, CommandFrame), frame_type
        assert message.command.action == action
        assert message.command.server_id == "s9"
        assert message.command.params == {"x": 1}
        assert message.legacy == frame_type


def test_legacy_server_command_carries_the_console_line() -> None:
    frame = {"type": "server_command", "data": {"serverId": "s", "command": "say hi"}}
    message = parse_frame(dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.command.action == "send_server_command"
    assert message.command.params == {"command": "say hi"}


def test_legacy_server_power_maps_each_word() -> None:
    for word, action in [("start", "start_server"), ("stop", "stop_server"),
                         ("restart", "restart_server"), ("kill", "kill_server"),
                         ("KILL", "kill_server"), ("restart_server", "restart_server")]:
        frame = {"type": "server_power", "data": {"serverId": "s", "action": word}}
        message = parse_frame(dumps(frame))
        assert isinstance(message, CommandFrame)
        assert message.command.action == action
        assert "action" not in message.command.params


def test_legacy_server_power_with_a_bad_word_is_invalid() -> None:
    frame = {"type": "server_power", "id": "p", "data": {"serverId": "s", "action": "explode"}}
    message = parse_frame(dumps(frame))
    assert isinstance(message, InvalidCommand)
    assert message.command_id == "p"


def test_system_info_request_and_ping() -> None:
    assert isinstance(parse_frame(b'{"type":"system_info_request"}'), SystemInfoRequest)
    message = parse_frame(b'{"type":"ping","id":42,"timestamp":1795482053257}')
    assert message == PingFrame(42)


def test_browser_frames_and_unknown_types_are_ignored() -> None:
    for frame in ({"type": "console", "data": "x"}, {"type": "stats"}, {"type": "whatever"},
                  {"type": 5}, {}):
        assert isinstance(parse_frame(dumps(frame)), Ignored)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    assert parse_frame(payload) is not None


@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_non_object_frames_are_ignored(value: Any) -> None:
    assert isinstance(parse_frame(dumps(value)), Ignored)


@given(
    command_id=ids,
    action=st.sampled_from(["start_server", "list_files", "console:history", "get_server_metrics"]),
    server_id=st.text(min_size=1, max_size=20),
    timestamp=odd_timestamps,
    payload=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "serverId"),
                            json_values, max_size=4),
    extra=st.dictionaries(st.text(max_size=8).filter(
        lambda k: k not in ("id", "type", "action", "serverId", "payload", "data", "timestamp")),
        json_values, max_size=4),
    nested=st.booleans(),
)
def test_commands_survive_odd_timestamps_and_extra_fields(
    command_id: Any, action: str, server_id: str, timestamp: Any, payload: dict[str, Any],
    extra: dict[str, Any], nested: bool,
) -> None:
    if nested:
        frame: dict[str, Any] = {"id": command_id, "type": "command",
                                 "data": {"action": action, "serverId": server_id, **payload}}
    else:
        frame = {"id": command_id, "type": "command", "action": action,
                 "serverId": server_id, "payload": payload}
    frame.update(extra)
    if timestamp is not None:
        frame["timestamp"] = timestamp
    message = parse_frame(dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.command.command_id == str(command_id)
    assert message.command.action == action
    assert message.command.server_id == server_id
    assert message.command.params == payload


@given(st.dictionaries(st.sampled_from(["id", "type", "action", "serverId", "payload", "data"]),
                       json_values, max_size=6))
def test_frames_with_missing_or_mistyped_fields_never_raise(frame: dict[str, Any]) -> None:
    message = parse_frame(dumps(frame))
    if isinstance(message, CommandFrame):
        assert message.command.action.strip()


@given(odd_timestamps)
def test_parse_timestamp_accepts_anything(value: Any) -> None:
    result = messages.parse_timestamp(value)
    assert result is None or (math.isfinite(result) and result >= -86400 * 366 * 3000)


def test_parse_timestamp_reads_iso_seconds_and_milliseconds() -> None:
    assert messages.parse_timestamp("2026-11-24T01:00:53.257Z") == NOW
    assert messages.parse_timestamp("2026-11-24T02:00:53.257+01:00") == NOW
    assert messages.parse_timestamp(1795482053257) == 1795482053.257
    assert messages.parse_timestamp(1795482053) == 1795482053.0
    assert messages.parse_timestamp(None) is None
    assert messages.parse_timestamp("yesterday") is None


@given(st.floats() | st.integers(min_value=-(10**30), max_value=10**30))
def test_iso_timestamp_never_raises_and_ends_in_z(value: float) -> None:
    text = messages.iso_timestamp(value)
    assert text.endswith("Z")
    datetime.fromisoformat(text.replace("Z", "+00:00"))


@given(st.floats(min_value=0, max_value=253402300799.0))
def test_iso_timestamp_reads_as_datetime_would_write_it(value: float) -> None:
    expected = datetime.fromtimestamp(value, tz=UTC).isoformat(timespec="milliseconds")
    assert messages.iso_timestamp(value) == expected.replace("+00:00", "Z")


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
    assert log["data"]["timestamp"] == log["timestamp"] == messages.iso_timestamp(NOW)
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
    json.loads(messages.encode(frames[0]))


def test_encode_is_compact_utf8_json_and_tolerates_odd_values() -> None:
    data = messages.encode({"a": "é", "when": datetime(2026, 1, 1)})
    assert data == '{"a":"é","when":"2026-01-01 00:00:00"}'.encode()
