"""
The real server manager and the real Panel link together, in memory: the
in-memory engine, a ``FakePanel`` over ``iosim``, one ``Clock``.  The agent
"dies" at the steps a SIGKILL can split: with lines in the link's batch
window, and with frames written into the transport's buffer but not yet taken
(the buffer dies with the process); then a new manager and link start on the
same state.  The Panel must see every line exactly once, in order.
"""

from __future__ import annotations

from dataclasses import replace

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed

from ctrlagent.panel.link import PanelLink
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.testing.panel import FakePanel, MemoryPanelEndpoint
from tests.panel.harness import SECRET, panel_config
from tests.servers.conftest import Unit, until
from tests.servers.test_console_marks_unit import engine_texts, journal
from tests.servers.test_manager_unit import PARAMS

S = ServerState
WINDOW = 0.05
# A batch leaves by then: its window and the batcher's slack (half a window).
SENT = WINDOW * 1.5


class Agent:
    """One agent process: a manager and its Panel link on the unit's state."""

    def __init__(self, unit: Unit, endpoint: MemoryPanelEndpoint) -> None:
        self.unit = unit
        self.endpoint = endpoint
        panel = panel_config(console_batch_window=WINDOW)
        config = replace(unit.config, secret=SECRET, panel=panel)
        store = open_store(reactor, config.state_dir)
        self.manager = ServerManager(reactor, config, unit.engine, store, clock=unit.clock)
        self.link = PanelLink(
            unit.clock, config, None, self.manager,  # type: ignore[arg-type]
            lambda: succeed({"os": "linux"}), lambda: succeed({}),
            endpoint=endpoint, random=lambda: 0.0,
        )
        self.link.factory.setProtocolOptions(closeHandshakeTimeout=0, serverConnectionDropTimeout=0)
        self.manager.startService()
        unit.managers.append(self.manager)
        self.link.startService()
        endpoint.flush()

    async def sigkill(self) -> None:
        """Die now: the socket's unsent bytes and the link's batches go with the process."""
        io = self.endpoint.pumps[-1].clientIO
        io.stream.clear()
        if io.producer is not None:
            io.producer.stopProducing()
            io.producer = None
        self.manager.simulate_crash()
        assert self.manager.crashed is not None
        await self.manager.crashed
        io.abortConnection()
        self.endpoint.flush()  # the Panel sees the connection drop
        # nothing of this process runs any more (stopping its service only ends
        # the reconnect schedule; its batches and outbox go nowhere)
        await self.link.stopService()


def server_lines(panel: FakePanel) -> list[str]:
    return [line for line in panel.console_lines("s1") if not line.startswith("[ctrlagent]")]


@pytest_twisted.ensureDeferred
async def test_a_sigkill_with_lines_batched_or_in_the_socket_buffer_loses_and_repeats_none(
    unit: Unit,
) -> None:
    panel = FakePanel(unit.clock, SECRET)
    endpoint = MemoryPanelEndpoint(panel)
    agent = Agent(unit, endpoint)
    assert agent.link.connected
    m = agent.manager
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    cid = m.get("s1").container_id or ""

    def say(word: str) -> None:
        unit.engine.stdin(cid, "say " + word)

    say("delivered")
    unit.clock.advance(SENT)
    endpoint.flush()
    assert "[Server] delivered" in server_lines(panel)
    delivered = journal(unit)["s1"]

    say("in-the-socket-buffer")
    unit.clock.advance(SENT)  # the batch is written to the transport, not taken
    assert endpoint.pumps[-1].clientIO.stream
    say("in-the-batch")
    assert journal(unit)["s1"] == delivered
    await agent.sigkill()
    assert "[Server] in-the-socket-buffer" not in server_lines(panel)

    say("while-down")
    agent = Agent(unit, endpoint)
    m = agent.manager
    await until(lambda: m.get("s1").output_attached, 2, "re-attached")
    unit.clock.advance(SENT)
    endpoint.flush()
    # history: exactly what the mark covered, then the replay as new lines
    texts = [text for _, text in engine_texts(unit, cid)]
    assert server_lines(panel) == texts
    assert m.console_history("s1", 100)[-len(texts):] == texts

    say("after-a-drain")
    unit.clock.advance(SENT)
    endpoint.flush()  # taken and settled: the journal has it in the same call
    settled = journal(unit)["s1"]
    await agent.sigkill()
    agent = Agent(unit, endpoint)
    await until(lambda: agent.manager.get("s1").output_attached, 2, "re-attached")
    unit.clock.advance(SENT)
    endpoint.flush()
    assert journal(unit)["s1"] == settled
    assert server_lines(panel) == [text for _, text in engine_texts(unit, cid)]
    assert len(panel.connections) == 3
    stopped = agent.link.stopService()
    endpoint.flush()  # the close handshake and the disconnection
    await stopped
