"""
End to end: ``twistd -n ctrlagent`` as a subprocess dials a real Autobahn
server on 127.0.0.1 playing the Panel, which drives it over the WebSocket the
way an older Panel does, while ``/health`` is watched over HTTP: ``connected``
follows the link, including while the Panel is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from ctrlagent.testing.panel import FakePanel
from tests.e2e.conftest import make_agent  # noqa: F401 - a fixture
from tests.rig.agentproc import AgentProcess, free_port

from .test_link_loopback import sleep, until

pytestmark = pytest.mark.e2e
reactor: Any = _reactor

UUID = "5e0c9a1d2b3c4d5e6f708192a3b4c5d6"

FAST_PANEL = (
    "heartbeat_interval = 0.5\nbackoff_initial = 0.1\nbackoff_max = 0.5\n"
    "stable_after = 1.0\nconsole_batch_window = 0.02\n"
)


async def health(agent: AgentProcess) -> dict[str, Any]:
    result: dict[str, Any] = await deferToThread(agent.health)
    return result


async def health_says(agent: AgentProcess, connected: bool, seconds: float = 10.0) -> None:
    """/health follows the link under ``panelLink``; the node itself stays ``connected``."""
    deadline = reactor.seconds() + seconds
    while True:
        body = await health(agent)
        # The Panel drives the agent over HTTP: the link never makes the node offline.
        assert body["connected"] is True, body
        if body["panelLink"]["connected"] is connected:
            assert body["panelLink"]["state"] == ("connected" if connected else "disconnected")
            return
        if reactor.seconds() > deadline:
            raise AssertionError("/health never said panelLink.connected={}".format(connected))
        await sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_twistd_agent_over_the_websocket_with_health_following_the_link(
    make_agent: Callable[..., AgentProcess], scripted_image: str  # noqa: F811
) -> None:
    port = free_port()
    agent = make_agent(panel_url="ws://127.0.0.1:{}".format(port), extra_config=FAST_PANEL)
    panel = FakePanel(reactor, agent.secret)
    listening = reactor.listenTCP(port, panel.factory, interface="127.0.0.1")
    try:
        await deferToThread(agent.start)
        await until(lambda: panel.current is not None, 15)
        await panel.wait_for_frame("system_info", 2).addTimeout(10, reactor)
        info = panel.frames("system_info")[0]["data"]
        assert info["nodeId"] == "e2e-node"
        assert panel.requests[0].params["nodeId"] == ["e2e-node"]
        await health_says(agent, True)

        panel.send({"id": "create", "type": "command", "action": "create_server",
                    "serverId": UUID, "agentId": "e2e-node",
                    "timestamp": "2026-11-24T03:00:00.000Z",
                    "payload": {"name": "e2e", "image": scripted_image,
                                "startup": "/usr/local/bin/gameserver",
                                "environment": {"STARTUP_LINE": "Done (0.1s)!"},
                                "limits": {"memory": 64, "swap": 0, "cpu": 50, "io": 500,
                                           "disk": 100},
                                "stop": {"type": "command", "value": "stop", "timeout": 5},
                                "startupDone": "Done ("}})
        await until(lambda: "create" in panel.responses(), 30)
        assert panel.responses()["create"][0]["success"] is True, panel.responses()
        panel.send({"id": "start", "type": "command",
                    "data": {"action": "start_server", "serverId": UUID}})
        # Its answer comes on this connection, before the Panel goes away below
        # (an answer whose connection dropped is not replayed on the next one).
        await until(lambda: "start" in panel.responses(), 30)
        await until(lambda: any(f["data"]["currentStatus"] == "running"
                                for f in panel.frames("server_status_changed")), 30)
        await until(lambda: "Done (0.1s)!" in panel.console_lines(UUID), 10)

        # An older Panel's file frames (agent.ts readFile/writeFile: no id) get
        # the file_content frames it reads.
        panel.send({"type": "file_write",
                    "data": {"serverId": UUID, "path": "motd.txt", "content": "hello\n"}})
        await until(lambda: len(panel.frames("file_content")) == 1, 10)
        panel.send({"type": "file_read", "data": {"serverId": UUID, "path": "motd.txt"}})
        await until(lambda: len(panel.frames("file_content")) == 2, 10)
        written, read = (f["data"] for f in panel.frames("file_content"))
        assert (written["serverId"], written["written"], written["size"]) == (UUID, True, 6)
        assert (read["serverId"], read["path"], read["content"]) == (UUID, "/motd.txt", "hello\n")
        panel.send({"type": "file_read", "data": {"serverId": UUID, "path": "missing.txt"}})
        await until(lambda: len(panel.frames("error")) == 1, 10)
        assert panel.frames("error")[0]["data"]["frameType"] == "file_read"

        # The Panel goes away: /health must say so, then recover with it.
        await listening.stopListening()
        panel.drop()
        await health_says(agent, False)
        listening = reactor.listenTCP(port, panel.factory, interface="127.0.0.1")
        await health_says(agent, True)
        await until(lambda: len(panel.connections) >= 2)
        await until(lambda: any(
            r.connection == len(panel.connections) - 1
            and r.frame.get("event") == "server_status_changed"
            and r.frame["data"]["previousStatus"] == r.frame["data"]["currentStatus"] == "running"
            for r in panel.received), 10)

        panel.send({"type": "server_power", "id": "power-stop",
                    "data": {"serverId": UUID, "action": "stop"}})
        await until(lambda: "power-stop" in panel.responses(), 15)
        await until(lambda: any(f["data"]["currentStatus"] == "offline"
                                for f in panel.frames("server_status_changed")), 15)
        responses = panel.responses()
        assert sorted(responses) == ["create", "power-stop", "start"]
        assert all(len(replies) == 1 and replies[0]["success"] for replies in responses.values())
        assert panel.frames("heartbeat")

        # A graceful agent stop closes the link cleanly.
        await deferToThread(agent.stop)
        await until(lambda: panel.current is None, 10)
    finally:
        await listening.stopListening()
