"""
The Panel's calls that answered ``UNKNOWN_ACTION`` before (issue 12), and
``read_file`` of a binary file, through ``twistd -n ctrlagent`` on the real
Docker engine, with the payloads exactly as externalAgentService sends them.
"""

from __future__ import annotations

import base64
import re
import time

import pytest

from tests.e2e.test_panel_http import create_payload, ok, post, wait_status
from tests.rig.agentproc import AgentProcess

pytestmark = pytest.mark.e2e

UUID = "5e1f0c2d3b4a49687a6b5c4d3e2f1a09"
PANEL_ID = "clxe2e0000issue12000abcde"


def _code(agent: AgentProcess, action: str, **payload: object) -> str:
    status, answer = post(agent, {"action": action, "serverId": PANEL_ID, "payload": payload})
    assert status == 200 and answer["success"] is False, answer
    return str(answer["code"])


def _history_until(agent: AgentProcess, text: str, timeout: float = 15.0) -> list[str]:
    history: list[str] = []
    for _ in range(int(timeout / 0.2)):
        history = ok(agent, "console:history", PANEL_ID, lines=100)["history"]
        if any(line.endswith(text) for line in history):
            return history
        time.sleep(0.2)
    raise AssertionError("{!r} never in the console: {}".format(text, history[-10:]))


def test_files_copy_move_permissions_and_binary_reads(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    payload = create_payload(scripted_image)
    payload["panelId"] = PANEL_ID
    ok(agent, "create_server", UUID, **payload)
    blob = bytes((i * 7 + 128) % 256 for i in range(3000))
    ok(agent, "create_directory", PANEL_ID, path="/world/region")
    ok(agent, "upload_file", PANEL_ID, path="/world/region/r.0.0.mca",
       content=base64.b64encode(blob).decode())
    ok(agent, "write_file", PANEL_ID, path="/world/level.txt", content="seed=1\n")

    # The Panel's batch copy reads as text and writes back: a binary is refused.
    assert _code(agent, "read_file", path="/world/region/r.0.0.mca") == "NOT_TEXT"
    lossy = ok(agent, "read_file", PANEL_ID, path="/world/region/r.0.0.mca", lossy=True)
    assert lossy["lossy"] is True and lossy["size"] == 3000

    copied = ok(agent, "copy_file", PANEL_ID, sourcePath="/world", destinationPath="/world-copy")
    assert (copied["files"], copied["directories"], copied["size"]) == (2, 2, 3007)
    down = ok(agent, "download_file", PANEL_ID, path="/world-copy/region/r.0.0.mca")
    assert base64.b64decode(down["content"]) == blob
    assert _code(agent, "copy_file", sourcePath="/world",
                 destinationPath="/world-copy") == "CONFLICT"
    assert _code(agent, "copy_file", sourcePath="/world",
                 destinationPath="/world/inner") == "INVALID_PAYLOAD"
    assert _code(agent, "copy_file", sourcePath="/../../etc",
                 destinationPath="/etc") == "PERMISSION_DENIED"

    moved = ok(agent, "move_file", PANEL_ID, sourcePath="/world-copy/level.txt",
               destinationPath="/configs/level.txt")
    assert moved == {"sourcePath": "/world-copy/level.txt", "destinationPath": "/configs/level.txt"}
    assert ok(agent, "read_file", PANEL_ID, path="/configs/level.txt")["content"] == "seed=1\n"

    ok(agent, "set_file_permissions", PANEL_ID, path="/configs/level.txt", mode="640")
    perms = ok(agent, "get_file_permissions", PANEL_ID, path="/configs/level.txt")
    assert set(perms) == {"path", "permissions", "mode", "owner", "group"}
    assert (perms["path"], perms["permissions"], perms["mode"]) == (
        "/configs/level.txt", "640", "0640")
    ok(agent, "delete_server", UUID, purgeFiles=True)


def test_console_input_interrupt_and_settings(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    payload = create_payload(scripted_image)
    payload["panelId"] = PANEL_ID
    ok(agent, "create_server", UUID, **payload)
    wait_status(agent, PANEL_ID, "offline")
    assert _code(agent, "console:input", input="say x\n") == "CONFLICT"

    settings = ok(agent, "console:settings:get", PANEL_ID)["settings"]
    assert set(settings) == {"historySize", "throttleLines", "throttleInterval", "timestamps"}
    changed = ok(agent, "console:settings:update", PANEL_ID,
                 settings={"historySize": 200, "timestamps": True})["settings"]
    assert (changed["historySize"], changed["timestamps"]) == (200, True)
    assert _code(agent, "console:settings:update",
                 settings={"historySize": 200, "colours": "on"}) == "INVALID_PAYLOAD"
    assert ok(agent, "console:settings:get", PANEL_ID)["settings"] == changed

    ok(agent, "start_server", UUID)
    wait_status(agent, PANEL_ID, "running")
    # Raw input: no newline is added, the line completes with the second call.
    assert ok(agent, "console:input", PANEL_ID, input="say half")["bytes"] == 8
    time.sleep(0.5)
    history = ok(agent, "console:history", PANEL_ID, lines=100)["history"]
    assert not any(line.endswith("> say half") for line in history)
    ok(agent, "console:input", PANEL_ID, input=" and half\n")
    history = _history_until(agent, "[Server] half and half")
    # Timestamps are on: every line starts with its time.
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in history), history[-5:]

    assert ok(agent, "console:interrupt", PANEL_ID)["signal"] == "SIGINT"
    _history_until(agent, "Stopping server (SIGINT)")
    wait_status(agent, PANEL_ID, "offline")
    ok(agent, "delete_server", UUID, purgeFiles=True)
