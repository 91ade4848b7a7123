"""
The Panel link flapping under a command burst.

A loopback ``FakePanel`` sends bursts of commands over the WebSocket link and
alternates two things on every connection:

- a *stable* burst: the Panel stops reading for a second while it sends
  (its socket buffers are small, so the agent's answers back up), then
  reads again; the connection stays up, so every command must get exactly
  one answer on it: an agent that cannot write must stop reading (back-pressure),
  never drop an answer;
- a *flapping* burst: the Panel drops the TCP connection in the middle of a
  burst.  Commands the agent had read keep running and may be answered on
  the next connection, at most once; the others are simply gone.

Afterwards no command has two answers, no answer names a command never sent,
and the agent is healthy with the link up.  The Panel's small outbox setting
(``outbox_size = 100``) makes the class show with bursts a test can afford.
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from ctrlagent.testing.panel import FakePanel
from tests.faults.rig import CODE, FaultAgent
from tests.rig.waiting import sleep, until

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow]

ROUNDS = 3
STABLE_BURST = 1500
PAUSE = 1.0

# Cheap commands of every outcome: data, a coded error, an unknown action.
COMMANDS: list[dict[str, Any]] = [
    {"action": "system.ping"},
    {"action": "list_servers"},
    {"action": "get_server_status", "serverId": "no-such-server"},
    {"action": "no_such_action"},
    {"action": "console:history", "serverId": "no-such-server", "payload": {"lines": 5}},
]




class Burst:
    """The commands the Panel sent, by id, with the connection each went out on."""

    def __init__(self, panel: FakePanel) -> None:
        self.panel = panel
        self.sent: dict[str, int] = {}
        self.stable: set[str] = set()
        self._n = 0

    def send(self, count: int, stable: bool) -> list[str]:
        assert self.panel.current is not None
        connection = self.panel.current.index
        ids = []
        for _ in range(count):
            self._n += 1
            command_id = "cmd_{}".format(self._n)
            frame = dict(COMMANDS[self._n % len(COMMANDS)], id=command_id, type="command")
            self.panel.send(frame)
            self.sent[command_id] = connection
            if stable:
                self.stable.add(command_id)
            ids.append(command_id)
        return ids

    def answers(self) -> list[tuple[str, int, Any]]:
        """``(id, connection, frame)`` of every response received."""
        return [
            (str(r.frame.get("id")), r.connection, r.frame)
            for r in self.panel.received
            if r.frame.get("type") == "response"
        ]

    def answered(self, ids: list[str]) -> int:
        wanted = set(ids)
        return len({i for i, _, _ in self.answers() if i in wanted})


def _well_formed(frame: dict[str, Any]) -> bool:
    if frame.get("success") is True:
        return True
    error = frame.get("error")
    return (
        frame.get("success") is False
        and isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and bool(CODE.match(error["code"]))
        and isinstance(error.get("message"), str)
    )


async def _next_connection(panel: FakePanel, after: int) -> Any:
    def ready() -> Any:
        current = panel.current
        if current is None or current.index <= after:
            return None
        if not panel.frames("system_info", connection=current.index):
            return None
        return current

    return await until(ready, 15, "the agent to reconnect")


@pytest_twisted.ensureDeferred
async def test_every_command_on_a_live_link_gets_exactly_one_answer_while_the_link_flaps(
    make_agent: Callable[..., FaultAgent],
) -> None:
    seed = int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    agent = make_agent(
        panel_settings="heartbeat_interval = 1\nbackoff_initial = 0.1\nbackoff_max = 0.3\n"
        "outbox_size = 100"
    )
    panel = FakePanel(reactor, agent.secret)
    port = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")
    # Accepted connections inherit a small receive buffer: a Panel that stops
    # reading makes the agent's writes back up after kilobytes, not megabytes.
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = Burst(panel)
    try:
        agent.panel_url = "ws://127.0.0.1:{}/agent".format(port.getHost().port)
        await deferToThread(agent.start)
        last = -1
        for _ in range(ROUNDS):
            connection = await _next_connection(panel, last)
            last = connection.index
            connection.transport.pauseProducing()
            ids = burst.send(STABLE_BURST, stable=True)
            await sleep(PAUSE)
            connection.transport.resumeProducing()
            try:
                await until(
                    lambda ids=ids: burst.answered(ids) == len(ids), 20, "the burst's answers"
                )
            except AssertionError:
                raise AssertionError(
                    "seed {}: connection {} stayed up, yet {} of {} commands got no answer".format(
                        seed, last, len(ids) - burst.answered(ids), len(ids)
                    )
                ) from None
            # Flap: drop the connection a random moment into a burst.
            burst.send(rng.randrange(20, 400), stable=False)
            await sleep(rng.uniform(0.0, 0.05))
            if panel.current is connection:
                panel.drop()

        connection = await _next_connection(panel, last)
        final = burst.send(50, stable=True)
        await until(lambda: burst.answered(final) == len(final), 20, "the last burst's answers")
        await sleep(1.0)  # answers of dropped connections still in the outbox

        answers = burst.answers()
        unknown = [i for i, _, _ in answers if i not in burst.sent]
        assert not unknown, "answers to commands never sent: {}".format(unknown[:10])
        counts = Counter(i for i, _, _ in answers)
        repeated = sorted(i for i, c in counts.items() if c > 1)
        assert not repeated, "seed {}: {} commands answered more than once: {}".format(
            seed, len(repeated), repeated[:10]
        )
        moved = [i for i, conn, _ in answers if i in burst.stable and conn != burst.sent[i]]
        assert not moved, "answers of a live connection arrived on another: {}".format(moved[:10])
        malformed = [f for _, _, f in answers if not _well_formed(f)]
        assert not malformed, "answers that are neither success nor coded error: {}".format(
            malformed[:3]
        )
        health = await deferToThread(agent.health)
        assert health["status"] == "healthy" and health["connected"] is True, health
    finally:
        await port.stopListening()
