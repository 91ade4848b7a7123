"""
The agent as a twistd subprocess dialling a Panel's WebSocket on loopback.

The Panel here is ``FakePanel``, a real Autobahn server behaving as PROTOCOL.md
section 3 records the Panel's endpoint.  Everything goes through the real
stack: link, dispatcher, server manager, Docker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from ctrlagent.testing.panel import FakePanel
from tests.rig.agentproc import AgentProcess

pytestmark = pytest.mark.e2e


async def _within(d: Deferred[Any], seconds: float, what: str) -> Any:
    try:
        return await d.addTimeout(seconds, reactor)
    except Exception as e:
        raise AssertionError("timed out waiting for " + what) from e


async def _until(predicate: Callable[[], Any], seconds: float, what: str) -> Any:
    for _ in range(int(seconds / 0.1)):
        value = predicate()
        if value:
            return value
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("timed out waiting for " + what)


def _response(panel: FakePanel, command_id: str) -> Deferred[Any]:
    def found(_received: object) -> Any:
        answers = panel.responses().get(command_id)
        return answers[-1] if answers else None

    return panel.wait_for(found)


@pytest_twisted.ensureDeferred
async def test_agent_serves_a_panel_over_websocket(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    agent = make_agent(
        panel_settings="heartbeat_interval = 0.5\nbackoff_initial = 0.2\nbackoff_max = 1.0"
    )
    panel = FakePanel(reactor, agent.secret)
    port = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")
    try:
        agent.panel_url = "ws://127.0.0.1:{}/agent".format(port.getHost().port)
        agent.start()
        info = await _within(panel.wait_for_frame("system_info"), 15, "system_info")
        assert info["data"]["nodeId"] == agent.node_id
        # The host's real figures, not an empty frame carrying only the node id.
        data = info["data"]
        assert data["hostname"] and data["agentVersion"] and data["cpuCount"] >= 1
        assert data["totalMemory"] > data["freeMemory"] > 0 and data["totalDisk"] > 0
        assert data["dockerVersion"] and data["docker"] is True
        assert "lo" in data["networks"] and len(data["loadAverage"]) == 3
        # A pong carries the host's load in percents (memory in use is never 0).
        panel.send({"type": "ping", "id": "ping-1"})
        pong = await _within(panel.wait_for_frame("pong"), 10, "pong")
        assert pong["id"] == "ping-1"
        load = pong["data"]["systemLoad"]
        assert set(load) == {"cpu", "memory", "disk"}
        assert 0 < load["memory"] <= 100 and 0 < load["disk"] <= 100
        request = panel.requests[-1]
        assert request.headers["x-node-id"] == agent.node_id
        assert request.params["nodeId"] == [agent.node_id]
        await _within(panel.wait_for_frame("heartbeat", 3), 10, "three heartbeats")
        beats = [r.at for r in panel.received if r.frame.get("type") == "heartbeat"]
        assert all(0.3 < b - a < 1.5 for a, b in zip(beats, beats[1:], strict=False)), beats
        assert agent.health()["connected"] is True
        assert agent.health()["panelLink"]["connected"] is True

        server_id = uuid.uuid4().hex
        panel.send(
            {
                "id": "cmd_1",
                "type": "command",
                "timestamp": "2026-11-24T00:00:00Z",
                "agentId": agent.node_id,
                "action": "create_server",
                "serverId": server_id,
                "payload": {
                    "name": "ws",
                    "image": scripted_image,
                    "startup": "/usr/local/bin/gameserver",
                    "environment": {},
                    "limits": {"memory": 64, "cpu": 50},
                },
            }
        )
        created = await _within(_response(panel, "cmd_1"), 30, "create response")
        assert created["success"] is True, created
        # The same record as over HTTP: the allocated port (the payload has none).
        assert [a["protocols"] for a in created["data"]["allocations"]] == [["tcp", "udp"]]
        # The Go agent's nested shape, with a numeric timestamp.
        panel.send(
            {
                "type": "command",
                "id": "cmd_2",
                "timestamp": 1795482053257,
                "data": {"action": "start_server", "serverId": server_id, "payload": {}},
            }
        )
        started = await _within(_response(panel, "cmd_2"), 30, "start response")
        assert started["success"] is True, started

        def running(_received: object) -> bool:
            return any(
                f["data"]["serverId"] == server_id and f["data"]["currentStatus"] == "running"
                for f in panel.frames("server_status_changed")
            )

        await _within(panel.wait_for(running), 20, "running event")
        panel.send(
            {
                "id": "cmd_3",
                "type": "command",
                "action": "send_server_command",
                "serverId": server_id,
                "payload": {"command": "say over the wire"},
            }
        )
        await _within(
            panel.wait_for(lambda _r: "[Server] over the wire" in panel.console_lines(server_id)),
            15,
            "console echo",
        )
        # A frame the agent does not understand is ignored, not fatal.
        panel.send({"type": "console", "data": {}})
        panel.send("not json")

        # The Panel dies mid-stream: /health must say so, then the agent comes back
        # and sends system_info and a fresh status snapshot.
        connections = len(panel.connections)
        panel.drop()
        await _until(
            lambda: agent.health()["panelLink"]["connected"] is False
            or len(panel.connections) > connections,
            10,
            "link down",
        )
        await _until(lambda: len(panel.connections) > connections, 15, "reconnect")
        await _within(panel.wait_for_frame("system_info", 2), 10, "second system_info")

        def snapshot(_received: object) -> bool:
            return any(
                f["data"]["serverId"] == server_id and f["data"]["status"] == "running"
                for f in panel.frames(
                    "server_status_changed", connection=len(panel.connections) - 1
                )
            )

        await _within(panel.wait_for(snapshot), 10, "status snapshot after reconnect")
        await _until(
            lambda: agent.health()["panelLink"]["connected"] is True, 10, "connected again"
        )
        assert agent.health()["connected"] is True

        panel.send(
            {
                "id": "cmd_4",
                "type": "command",
                "action": "stop_server",
                "serverId": server_id,
                "payload": {"timeout": 5},
            }
        )
        stopped = await _within(_response(panel, "cmd_4"), 30, "stop response")
        assert stopped["success"] is True, stopped
        panel.send({"id": "cmd_5", "type": "command", "action": "no_such_action"})
        unknown = await _within(_response(panel, "cmd_5"), 10, "unknown-action response")
        assert unknown["success"] is False
        assert unknown["error"]["code"] == "UNKNOWN_ACTION"
        # Every command answered exactly once.
        answers = panel.responses()
        assert all(len(answers[c]) == 1 for c in ("cmd_1", "cmd_2", "cmd_3", "cmd_4", "cmd_5")), (
            answers
        )
    finally:
        agent.stop()
        await port.stopListening()
