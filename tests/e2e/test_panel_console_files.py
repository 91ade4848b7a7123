"""
The Panel's calls that answered ``UNKNOWN_ACTION`` before (issue 12), and
``read_file`` of a binary file, through ``twistd -n ctrlagent`` on the real
Docker engine, with the payloads exactly as externalAgentService sends them.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.testing.panel import FakePanel
from tests.e2e.test_panel_http import create_payload, ok, post, wait_status
from tests.e2e.test_panel_websocket import _response, _until, _within
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


@pytest_twisted.ensureDeferred
async def test_the_same_calls_over_the_panel_websocket(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    agent = make_agent(panel_settings="backoff_initial = 0.2\nbackoff_max = 1.0")
    panel = FakePanel(reactor, agent.secret)
    port = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")
    counter = iter(range(1, 1000))

    async def command(action: str, server_id: str, **payload: Any) -> dict[str, Any]:
        cid = "cmd_{}".format(next(counter))
        panel.send({"id": cid, "type": "command", "action": action, "serverId": server_id,
                    "payload": payload})
        answer: dict[str, Any] = await _within(_response(panel, cid), 30, action)
        return answer

    try:
        agent.panel_url = "ws://127.0.0.1:{}/agent".format(port.getHost().port)
        agent.start()
        await _within(panel.wait_for_frame("system_info"), 15, "system_info")
        server_id = uuid.uuid4().hex
        payload = create_payload(scripted_image)
        payload["panelId"] = PANEL_ID
        created = await command("create_server", server_id, **payload)
        assert created["success"] is True, created
        answer = await command("upload_file", PANEL_ID, path="/map.bin",
                               content=base64.b64encode(b"\x00\xff\xfe" * 100).decode())
        assert answer["success"] is True, answer
        refused = await command("read_file", PANEL_ID, path="/map.bin")
        assert refused["success"] is False and refused["error"]["code"] == "NOT_TEXT"
        copied = await command("copy_file", PANEL_ID, sourcePath="/map.bin",
                               destinationPath="/maps/map2.bin")
        assert copied["success"] is True and copied["data"]["size"] == 300, copied
        moved = await command("move_file", PANEL_ID, sourcePath="/maps/map2.bin",
                              destinationPath="/map3.bin")
        assert moved["data"]["destinationPath"] == "/map3.bin", moved
        perms = await command("get_file_permissions", PANEL_ID, path="/map3.bin")
        assert perms["data"]["permissions"] == "644", perms
        updated = await command("console:settings:update", PANEL_ID,
                                settings={"timestamps": True})
        assert updated["data"]["settings"]["timestamps"] is True, updated
        unknown = await command("console:settings:update", PANEL_ID, settings={"x": 1})
        assert unknown["error"]["code"] == "INVALID_PAYLOAD", unknown
        got = await command("console:settings:get", PANEL_ID)
        assert got["data"]["settings"] == updated["data"]["settings"]
        assert (await command("start_server", server_id))["success"] is True
        await _until(lambda: any(f["data"]["currentStatus"] == "running"
                                 for f in panel.frames("server_status_changed")), 20, "running")
        sent = await command("console:input", PANEL_ID, input="say over the link\n")
        assert sent["success"] is True, sent

        def stamped_line() -> bool:
            return any(re.match(r"\[\d\d:\d\d:\d\d\] \[Server\] over the link$", line)
                       for f in panel.frames("server_log") for line in f["data"]["lines"])

        await _until(stamped_line, 15, "the stamped console line")
        seen = len(panel.frames("server_status_changed"))
        interrupted = await command("console:interrupt", PANEL_ID)
        assert interrupted["data"]["signal"] == "SIGINT", interrupted
        await _until(lambda: any(f["data"]["currentStatus"] == "offline"
                                 for f in panel.frames("server_status_changed")[seen:]),
                     20, "offline after the Ctrl+C")
        assert (await command("delete_server", server_id, purgeFiles=True))["success"] is True
    finally:
        agent.stop()
        await port.stopListening()
