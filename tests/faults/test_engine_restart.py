"""
The Docker engine restarted under a loaded agent.

A private engine (``private_docker``: the session's shared engine is never
stopped) runs a game server flooding its console and a stopped one, while a
client polls the agent as the Panel does.  The engine is stopped (its
containers stop with it: no live-restore) and started again.  The agent must
keep answering every request (``/health`` may say 503 while the engine is
gone, commands answer coded errors, never anything else), report the engine
back on ``/health``, put each server back in its real state (the one that
should run runs again in its own container, the stopped one stays stopped)
and resume the console.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.rig import CODE, FaultAgent, docker_inspect, wait_for
from tests.rig.images import build_scripted_image

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow]

# Ten lines every 0.1 s, forever; "boot" marks each start of the container.
# SIGTERM ends it at once (PID 1 has no default handler), as a game does.
PRINTER = (
    "trap 'exit 0' TERM; echo boot; i=0; while :; do j=0; while [ $j -lt 10 ]; do "
    'i=$((i+1)); echo "tick $i"; j=$((j+1)); done; sleep 0.1; done'
)


class Poller(threading.Thread):
    """Polls the agent as a Panel does; records every answer that is not acceptable."""

    def __init__(self, agent: FaultAgent, server_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.server_ids = server_ids
        self.stopping = threading.Event()
        self.calls = 0
        self.bad: list[str] = []
        self.health_codes: set[int] = set()

    def run(self) -> None:
        commands = [("get_server_status", s) for s in self.server_ids] + [
            ("console:history", self.server_ids[0]),
            ("list_servers", None),
        ]
        n = 0
        while not self.stopping.is_set():
            self._health()
            action, server_id = commands[n % len(commands)]
            n += 1
            try:
                answer = self.agent.call(action, server_id, {"lines": 20}, timeout=10)
            except AssertionError as e:
                self.bad.append(str(e))
            else:
                ok = answer.get("success") is True or (
                    answer.get("success") is False
                    and isinstance(answer.get("code"), str)
                    and CODE.match(answer["code"])
                )
                if not ok:
                    self.bad.append("{}: {!r}".format(action, answer))
            self.calls += 1
            self.stopping.wait(0.02)

    def _health(self) -> None:
        try:
            with urllib.request.urlopen(self.agent.base_url + "/health", timeout=5) as response:
                code, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        except OSError as e:
            self.bad.append("/health: no answer: {}".format(e))
            return
        self.health_codes.add(code)
        if code not in (200, 503):
            self.bad.append("/health answered {}".format(code))
            return
        try:
            json.loads(body)
        except ValueError:
            self.bad.append("/health answered {} with {!r}".format(code, body[:200]))


def _history(agent: FaultAgent, server_id: str) -> list[str]:
    answer = agent.call("console:history", server_id, {"lines": 1000})
    assert answer["success"] is True, answer
    return list(answer["data"]["history"])


def test_the_agent_rides_out_an_engine_restart_under_load(
    make_agent: Callable[..., FaultAgent], private_docker: Callable[[], Any]
) -> None:
    engine = private_docker()
    image = build_scripted_image(engine.host)
    agent = make_agent(docker_host=engine.host).start()
    tag = uuid.uuid4().hex[:8]
    running, stopped = "run-" + tag, "off-" + tag
    for server_id in (running, stopped):
        created = agent.call(
            "create_server",
            server_id,
            {"name": server_id, "image": image, "startup": PRINTER,
             "limits": {"memory": 64, "cpu": 50}},
        )
        assert created["success"] is True, created
    assert agent.call("start_server", running)["success"] is True
    wait_for(lambda: len(_history(agent, running)) > 30, 20, "the console flowing")
    container = agent.call("get_server_status", running)["data"]["containerId"]

    poller = Poller(agent, [running, stopped])
    poller.start()
    try:
        engine.kill_engine()
        wait_for(lambda: agent.health()["docker"] is False, 15, "/health to report the engine gone")
        time.sleep(1.0)
        engine.start()
        wait_for(lambda: agent.health()["docker"] is True, 20, "/health to report the engine back")

        def back_to_real_state() -> bool:
            status = agent.call("get_server_status", running)["data"]
            return status["status"] == "running"

        wait_for(back_to_real_state, 30, "the running server to run again")
        time.sleep(1.0)  # keep polling a little after the return
    finally:
        poller.stopping.set()
        poller.join(15)
    assert not poller.bad, "answers a Panel cannot take during the restart:\n" + "\n".join(
        poller.bad[:10]
    )
    assert poller.calls > 20, poller.calls
    # The poller saw the engine gone (so it covered the restart), and back.
    assert poller.health_codes == {200, 503}, poller.health_codes

    health = agent.health()
    assert health["status"] == "healthy" and health["docker"] is True, health
    status = agent.call("get_server_status", running)["data"]
    real = docker_inspect(engine.host, status["containerId"])
    assert real["State"]["Running"] is True, real["State"]
    assert status["containerId"] == container, "the server got a new container"
    off = agent.call("get_server_status", stopped)["data"]
    assert off["status"] == "offline", off
    if off.get("containerId"):
        assert docker_inspect(engine.host, off["containerId"])["State"]["Running"] is False

    # The console resumed: the second boot (after the first run's ticks; agent
    # notices may come between) and lines after it reach the console.
    def resumed() -> bool:
        history = _history(agent, running)
        first_tick = next((i for i, line in enumerate(history) if line.startswith("tick ")), None)
        reboots = [
            i for i, line in enumerate(history)
            if line == "boot" and first_tick is not None and i > first_tick
        ]
        return bool(reboots) and len(history) - reboots[-1] > 30

    try:
        wait_for(resumed, 15, "console lines after the engine came back")
    except AssertionError:
        history = _history(agent, running)
        boots = [i for i, line in enumerate(history) if line == "boot"]
        raise AssertionError(
            "the console did not resume: {} lines, 'boot' at {}, around them {}, last {}".format(
                len(history), boots, [history[max(0, i - 2):i + 3] for i in boots], history[-3:]
            )
        ) from None
