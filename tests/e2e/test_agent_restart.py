"""
An agent killed with SIGKILL and started again while its game servers run.

The servers must keep running, the new agent must re-attach, and the console
must hold every line exactly once: the lines printed before the crash, while
no agent was running, and after the restart.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.rig.agentproc import AgentProcess

pytestmark = pytest.mark.e2e


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def _ticks(agent: AgentProcess, server_id: str) -> list[int]:
    answer = agent.command_sync(
        {"action": "console:history", "serverId": server_id, "payload": {"lines": 1000}}
    )
    assert answer["success"] is True, answer
    history = answer["data"]["history"]
    ticks = []
    for line in history:
        m = re.search(r"\btick (\d+)$", line)
        if m:
            ticks.append(int(m.group(1)))
    return ticks


def _say(agent: AgentProcess, server_id: str, text: str) -> None:
    """A console command the game echoes; waits until its line is printed."""
    answer = agent.command_sync({"action": "console:command", "serverId": server_id,
                                 "payload": {"command": "say " + text}})
    assert answer["success"] is True, answer
    _wait_for(lambda: "[Server] " + text in agent.command_sync(
        {"action": "console:history", "serverId": server_id, "payload": {"lines": 1000}}
    )["data"]["history"], 10, "the game's echo of " + text)


def test_sigkilled_agent_reattaches_and_keeps_every_line_once(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    agent = make_agent().start()
    server_id = uuid.uuid4().hex
    created = agent.command_sync(
        {
            "action": "create_server",
            "serverId": server_id,
            "payload": {
                "name": "restart-test",
                "image": scripted_image,
                "startup": "/usr/local/bin/gameserver",
                "environment": {"TICK_INTERVAL": 0.2},
                "limits": {"memory": 64, "swap": 0, "disk": 100, "cpu": 50, "io": 500},
            },
        }
    )
    assert created["success"] is True, created
    started = agent.command_sync({"action": "start_server", "serverId": server_id, "payload": {}})
    assert started["success"] is True, started
    _wait_for(lambda: len(_ticks(agent, server_id)) >= 3, 15, "ticks before the crash")
    status = agent.command_sync({"action": "get_server_status", "serverId": server_id})["data"]
    container_id = status["containerId"]
    assert status["status"] == "running"
    # The server joined the agent's own network (docker.network_name).
    env = dict(os.environ, DOCKER_HOST=agent.docker_host)
    # Podman's inspect says "bridge" for any bridge network: the network a
    # container joined is then the one key of NetworkSettings.Networks.
    template = ("{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}"
                if agent.runtime == "podman" else "{{.HostConfig.NetworkMode}}")
    network = subprocess.run(
        ["docker", "inspect", "-f", template, container_id],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()
    assert network == "ctrl-alt-play"
    _say(agent, server_id, "before the kill")

    agent.kill()
    time.sleep(1.5)  # about 7 ticks are printed while no agent runs
    agent.start()

    def caught_up() -> list[int]:
        # The console is followed first and its history read back behind it:
        # caught up once the first tick is back in front of the newest.
        ticks = _ticks(agent, server_id)
        return ticks if ticks and ticks[-1] >= 12 and ticks[0] == 1 else []

    ticks = _wait_for(caught_up, 20, "ticks after the restart, the history read back")
    # Every tick exactly once and in order, with none lost across the crash.
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), ticks
    status = agent.command_sync({"action": "get_server_status", "serverId": server_id})["data"]
    assert status["status"] == "running"
    assert status["containerId"] == container_id  # the same container kept running
    # Its allocated port (the payload had none) is the one it had before.
    assert status["allocations"] == created["data"]["allocations"]
    assert len(created["data"]["allocations"]) == 1

    # Console input reaches the game after the SIGKILL (on Podman through the
    # run's stdin holder, which outlived the killed agent), exactly once.
    _say(agent, server_id, "after the kill")
    history = agent.command_sync(
        {"action": "console:history", "serverId": server_id, "payload": {"lines": 1000}}
    )["data"]["history"]
    for said in ("before the kill", "after the kill"):
        assert history.count("[Server] " + said) == 1, history

    stopped = agent.command_sync(
        {"action": "stop_server", "serverId": server_id, "payload": {"timeout": 5}}
    )
    assert stopped["success"] is True, stopped
