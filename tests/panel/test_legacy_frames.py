"""
Every legacy typed frame gets an answer (issue 12, item 6).

The Panels of the generation before "Issue #27" (their ``src/services/agent.ts``)
send ``{type, data}`` frames without an id and read ``file_content`` for files
and ``server_status`` for servers.  These tests walk the whole legacy table
(``wire.tables.LEGACY_FRAME_TYPES`` plus ``server_power``), with the payloads
that Panel sends: a frame that works gets exactly one answer of the shape its
Panel reads, one that fails exactly one ``error`` frame naming it, never silence.
"""

from __future__ import annotations

from typing import Any

import pytest

from ctrlagent.wire.frames import LEGACY_ANSWER_TYPES
from ctrlagent.wire.tables import LEGACY_FRAME_TYPES

from .harness import Harness

LEGACY_TYPES = sorted({*LEGACY_FRAME_TYPES, "server_power"})

# One working frame of each type, in an order that works on one server, with
# the data that Panel's agent.ts sends.
WORKING: dict[str, dict[str, Any]] = {
    "server_create": {
        "serverId": "s9", "image": "busybox", "startup": "./run.sh",
        "environment": {"EULA": "true"},
        "limits": {"memory": 512, "swap": 0, "disk": 1024, "io": 500, "cpu": 100},
    },
    "server_start": {"serverId": "s1"},
    "server_command": {"serverId": "s1", "command": "say hi"},
    "server_stop": {"serverId": "s1"},
    "server_restart": {"serverId": "s1"},
    "server_power": {"serverId": "s1", "action": "stop"},
    "file_write": {"serverId": "s1", "path": "server.properties", "content": "motd=hi\n"},
    "file_read": {"serverId": "s1", "path": "server.properties"},
    "server_update": {"serverId": "s1", "environment": {"EULA": "false"}},
    "server_suspend": {"serverId": "s1"},
    "server_unsuspend": {"serverId": "s1"},
    "server_reinstall": {"serverId": "s1"},
    "server_delete": {"serverId": "s1"},
}

ANSWERS = ("file_content", "server_status", "error", "response")


def test_the_walks_cover_the_whole_legacy_table() -> None:
    # A new legacy type must come with its answer and its place in these walks.
    assert sorted(WORKING) == LEGACY_TYPES
    assert sorted(LEGACY_ANSWER_TYPES) == LEGACY_TYPES


def answers_to(rig: Harness, frame: Any) -> list[dict[str, Any]]:
    """The answer frames the agent sent for ``frame`` (events and heartbeats left out)."""
    before = len(rig.panel.received)
    rig.panel.send(frame)
    rig.flush()
    rig.advance(40.0)  # past every long action's deadline
    return [r.frame for r in rig.panel.received[before:] if r.frame.get("type") in ANSWERS]


def test_every_legacy_frame_that_works_is_answered_once_in_its_panels_shape() -> None:
    # Legacy events off: every server_status seen is an answer.
    rig = Harness(legacy_frames=False)
    rig.create_server("s1")
    rig.start()
    answered: dict[str, dict[str, Any]] = {}
    for frame_type, data in WORKING.items():
        got = answers_to(rig, {"type": frame_type, "data": data})
        assert [f["type"] for f in got] == [LEGACY_ANSWER_TYPES[frame_type]], (frame_type, got)
        answered[frame_type] = got[0]["data"]
    assert answered["file_read"] == {
        "serverId": "s1", "path": "/server.properties", "content": "motd=hi\n",
        "encoding": "utf8", "size": 8, "modified": answered["file_read"]["modified"],
    }
    assert answered["file_write"] == {
        "serverId": "s1", "path": "/server.properties", "size": 8,
        "modified": answered["file_write"]["modified"], "written": True,
    }
    assert (answered["server_create"]["serverId"], answered["server_create"]["status"]) == (
        "s9", "offline")
    assert answered["server_start"]["status"] in ("starting", "running")
    assert answered["server_command"]["status"] == "running"  # the server's current status
    assert answered["server_power"]["status"] == "offline"
    assert answered["server_suspend"]["status"] == "suspended"
    assert answered["server_delete"] == {**answered["server_delete"], "serverId": "s1",
                                         "status": "deleted"}
    assert all(isinstance(a["status"], str) for t, a in answered.items() if t.startswith("server"))
    assert rig.link.connected


def failing(frame_type: str) -> tuple[dict[str, Any], str]:
    """A frame of ``frame_type`` that fails, and the code it fails with."""
    if frame_type == "server_create":
        return {"serverId": "s9", "startup": "./run.sh"}, "INVALID_PAYLOAD"  # no image
    return {**WORKING[frame_type], "serverId": "ghost"}, "SERVER_NOT_FOUND"


@pytest.mark.parametrize("frame_type", LEGACY_TYPES)
def test_every_legacy_frame_that_fails_is_answered_with_one_error_frame(frame_type: str) -> None:
    rig = Harness()
    rig.create_server("s1")
    rig.start()
    data, code = failing(frame_type)
    for frame, expected in [
        ({"type": frame_type, "data": data}, code),
        ({"type": frame_type, "data": "not an object"}, "INVALID_PAYLOAD"),
        ({"type": frame_type}, "SERVER_NOT_FOUND" if frame_type != "server_create"
         else "INVALID_PAYLOAD"),
    ]:
        got = answers_to(rig, frame)
        assert [f["type"] for f in got] == ["error"], (frame, got)
        error = got[0]["data"]
        assert error["frameType"] == frame_type
        assert error["code"] in (expected, "INVALID_PAYLOAD"), (frame, error)
        assert got[0]["error"]["code"] == error["code"] and error["message"]
    # With an id (requestId, as some senders put it), the answer is a response carrying it.
    got = answers_to(rig, {"type": frame_type, "requestId": "r1", "data": data})
    assert [(f["type"], f["requestId"], f["success"]) for f in got] == [("response", "r1", False)]
    assert got[0]["error"]["code"] == code
    assert rig.link.connected


@pytest.mark.parametrize("frame_type", LEGACY_TYPES)
def test_an_undecodable_legacy_frame_is_answered_too(frame_type: str) -> None:
    rig = Harness()
    rig.start()
    # Cut off in the middle: not JSON, but its type can still be read.
    cut = '{"type": "' + frame_type + '", "data": {"serverId": "s1", "path": "server.pro'
    got = answers_to(rig, cut)
    assert [f["type"] for f in got] == ["error"], got
    assert got[0]["data"]["code"] == "PARSE_ERROR"
