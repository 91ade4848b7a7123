"""
The pure frame layer of the Panel link: parsing what the Panel sends and
building what the agent sends (PROTOCOL.md section 3).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.errors import ServerNotFound
from ctrlagent.events import ResourceUpdate, StatusChanged
from ctrlagent.wire import frames as messages
from ctrlagent.wire.command import ActionResult, UnrepresentableNumber
from ctrlagent.wire.frames import (
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
# What a command payload may hold: numbers within +/-2**53 (see check_payload).
usable_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(min_value=-(2.0**53), max_value=2.0**53) | st.text()
)
usable_values = st.recursive(
    usable_scalars,
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
    assert message.command.command_id == 7  # as sent: a number stays a number
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
                            usable_values, max_size=4),
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
    assert message.command.command_id == command_id
    assert type(message.command.command_id) is type(command_id)
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


# --- ids, numbers, nesting and the encoder ---------------------------------------------------


@pytest.mark.parametrize("frame_id", ["cmd_1", "", "\ud800", "é😀", 0, 7, -3, 1.5, 2**53])
def test_a_usable_id_is_kept_as_decoded(frame_id: Any) -> None:
    message = parse_frame(dumps({"id": frame_id, "type": "command", "action": "list_servers"}))
    assert isinstance(message, CommandFrame)
    assert message.command.command_id == frame_id
    assert type(message.command.command_id) is type(frame_id)


@pytest.mark.parametrize("text", ["true", "false", "[1]", '{"a":1}', "9007199254740993", "1e300",
                                  "1e999", "-1e999", "NaN", "Infinity", "1" * 5000])
def test_an_unusable_id_is_refused_but_kept_as_sent(text: str) -> None:
    message = parse_frame('{"id":' + text + ',"type":"command","action":"list_servers"}')
    assert isinstance(message, InvalidCommand)
    assert message.error.code == "INVALID_PAYLOAD" and message.error.details["field"] == "id"
    reply = messages.encode(messages.response_for_error(message.command_id, message.error, NOW))
    echoed = reply[len(b'{"id":'):].split(b',"type"')[0]
    if text in ("NaN", "Infinity"):
        assert echoed == b"null"  # not JSON: nothing could carry it back
    else:
        assert json.loads(echoed, parse_int=Decimal, parse_float=Decimal) == json.loads(
            text, parse_int=Decimal, parse_float=Decimal)


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity",
                                     "9007199254740993", "-1e300", "1" * 5000])
@pytest.mark.parametrize("shape", ["flat", "nested", "legacy"])
def test_an_out_of_range_number_anywhere_in_a_command_is_invalid_payload_naming_the_field(
    literal: str, shape: str,
) -> None:
    limits = '{"memory":512,"cpu":' + literal + "}"
    if shape == "flat":
        text = ('{"id":"n","type":"command","action":"create_server","serverId":"s",'
                '"payload":{"image":"i","limits":' + limits + "}}")
    elif shape == "nested":
        text = ('{"id":"n","type":"command","data":{"action":"create_server","serverId":"s",'
                '"image":"i","limits":' + limits + "}}")
    else:
        text = '{"id":"n","type":"server_create","data":{"serverId":"s","limits":' + limits + "}}"
    message = parse_frame(text)
    assert isinstance(message, InvalidCommand)
    assert message.command_id == "n"
    assert message.error.code == "INVALID_PAYLOAD"
    assert message.error.details["field"] == "limits.cpu"


def test_the_envelope_timestamp_is_never_judged() -> None:
    message = parse_frame('{"id":"t","type":"command","action":"list_servers","timestamp":1e999}')
    assert isinstance(message, CommandFrame)


@pytest.mark.parametrize("depth", [65, 1000, 200_000])
def test_a_frame_nested_too_deep_is_a_parse_error_that_keeps_its_id(depth: int) -> None:
    deep = "[" * depth + "]" * depth
    flat = parse_frame('{"id":"f","type":"command","action":"x","payload":{"a":' + deep + "}}")
    nested = parse_frame('{"type":"command","data":{"id":"n","action":"x","a":' + deep + "}}")
    legacy = parse_frame('{"type":"server_create","requestId":"r","data":{"a":' + deep + "}}")
    ping = parse_frame('{"type":"ping","id":"p","junk":' + deep + "}")
    stats = parse_frame('{"type":"stats","id":"s","junk":' + deep + "}")
    bare = parse_frame(deep)
    for message, command_id in ((flat, "f"), (nested, "n"), (legacy, "r"), (bare, None)):
        assert isinstance(message, InvalidCommand)
        assert (message.command_id, message.error.code) == (command_id, "PARSE_ERROR")
    assert isinstance(legacy, InvalidCommand) and legacy.id_field == "requestId"
    assert ping == PingFrame("p")
    assert isinstance(stats, Ignored)


def test_a_frame_within_the_depth_limit_but_deeper_than_a_payload_may_be_is_invalid_payload(
) -> None:
    deep = "[" * 40 + "]" * 40
    message = parse_frame('{"id":"d","type":"command","action":"x","payload":{"a":' + deep + "}}")
    assert isinstance(message, InvalidCommand)
    assert message.error.code == "INVALID_PAYLOAD"
    assert message.error.details["field"].startswith("a[0][0]")


@pytest.mark.parametrize(("payload", "command_id"), [
    (b'{"id":"u","type":"command","action":"x","payload":{"p":"\xc3\x28"}}', "u"),
    (b'{"id":"u","type":"command","action":"x","payload":{"p":"\xed\xa0\x80"}}', "u"),
    (b"\xff\xfe\xfd", None),
    (b'{"id":"cut","type":"command"', None),
    (b"", None),
])
def test_a_frame_that_is_not_utf8_json_is_a_parse_error(payload: bytes, command_id: Any) -> None:
    message = parse_frame(payload)
    assert isinstance(message, InvalidCommand)
    assert (message.command_id, message.error.code) == (command_id, "PARSE_ERROR")


nested_json = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), children, max_size=3),
    max_leaves=20,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@given(nested_json, st.integers(min_value=0, max_value=6))
def test_nesting_is_measured_without_counting_brackets_in_strings(value: Any, limit: int) -> None:
    assert messages.nested_deeper_than(json.dumps(value), limit) == (_depth(value) > limit)


odd_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats() | st.text(st.characters(blacklist_categories=()))
    | st.sampled_from([UnrepresentableNumber("1e999"), UnrepresentableNumber("NaN"),
                       datetime(2026, 1, 1), frozenset({1, 2}), b"bytes"])
    | st.builds(pow, st.just(10), st.just(5000)),  # an int too long to write in decimal
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(st.characters(blacklist_categories=()), max_size=4) | st.integers(),
                      children, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=5), odd_values, max_size=4), odd_values)
def test_encode_never_fails_and_always_writes_strict_utf8_json(
    frame: dict[str, Any], frame_id: Any,
) -> None:
    frame["id"] = frame_id
    data = messages.encode(frame)

    def refuse(literal: str) -> Any:
        raise AssertionError(literal)

    decoded = json.loads(data.decode("utf-8"), parse_int=Decimal, parse_float=Decimal,
                         parse_constant=refuse)
    if isinstance(frame_id, str):
        # What the Panel reads back is the very string (surrogate pairs aside,
        # which JSON joins into one character either way).
        assert decoded["id"] == json.loads(json.dumps(frame_id))
    if isinstance(frame_id, UnrepresentableNumber) and frame_id.is_json:
        assert data.startswith(b'{"id":1e999')


def test_console_frames_keep_utf8_compact_and_escape_only_lone_surrogates() -> None:
    assert messages.encode({"a": "é"}) == '{"a":"é"}'.encode()
    assert messages.encode({"a": "\udcff"}) == b'{"a":"\\udcff"}'
    assert messages.encode({"a": float("nan"), "b": [float("inf")]}) == b'{"a":null,"b":[null]}'
