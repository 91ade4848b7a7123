"""
The frames the Panel sends, decoded and classified (``wire.incoming``,
PROTOCOL.md section 3): commands flat, nested and legacy, ids echoed as sent,
numbers and nesting no action can use, frames that do not decode.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.wire import frames as messages
from ctrlagent.wire.incoming import (
    CommandFrame,
    Ignored,
    InvalidCommand,
    PingFrame,
    SystemInfoRequest,
    parse_frame,
)
from ctrlagent.wire.json import encode
from tests.wire.samples import NOW, dumps, ids, json_values, odd_timestamps, usable_values

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
    reply = encode(messages.response_for_error(message.command_id, message.error, NOW))
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
