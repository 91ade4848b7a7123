"""
What one ``Server`` needs from the agent, handed to it once (``ServerServices``).

A server never reaches back to the ``ServerManager``: the manager builds
these services, gives them to every server it creates and otherwise only
calls the servers.  ``ServerNetwork`` is the servers' container network;
``RowWriter`` writes a server's row of the store in the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import DeferredSemaphore

from ctrlagent.config import AgentConfig
from ctrlagent.engine.interface import IContainerEngine
from ctrlagent.servers.containers import MANAGED_LABEL
from ctrlagent.servers.datadir import DataDirs
from ctrlagent.servers.delivery import ConsoleDelivery, EventBus
from ctrlagent.servers.locks import FileLocks
from ctrlagent.servers.stats import StatsHub
from ctrlagent.work import Deadlines, Tracker


class ServerNetwork:
    """The network the servers' containers join (``docker.network_name`` or an engine mode)."""

    def __init__(self, engine: IContainerEngine, mode: str, subnet: str | None) -> None:
        self.engine = engine
        self.mode = mode
        self.subnet = subnet

    async def ensure(self) -> None:
        """
        Make sure the servers' network exists before a container joins it.

        The engine's own modes need nothing (the engine knows them); the
        agent's network (``docker.network_name``) is created, labelled as
        ours, when missing (an operator may have removed it).  Called before
        every create, which is rare.
        """
        await self.engine.ensure_network(self.mode, self.subnet, {MANAGED_LABEL: "true"})


class RowWriter:
    """Writes fields of a server's store row in the background, in order."""

    def __init__(self, store: Any, tracker: Tracker) -> None:
        self.store = store
        self.tracker = tracker
        self.halted = False

    def write(self, server_id: str, **fields: Any) -> None:
        """Queue the write; its failure is logged by the tracker."""
        if self.halted:
            return
        self.tracker.track(self.store.update(server_id, **fields), "store " + server_id)

    def halt(self) -> None:
        """The agent died (tests' SIGKILL): nothing more is written."""
        self.halted = True


@dataclass(frozen=True)
class ServerServices:
    """Everything a ``Server`` uses, shared by all servers of one manager."""

    engine: IContainerEngine
    clock: Any
    deadlines: Deadlines
    tracker: Tracker
    bus: EventBus
    delivery: ConsoleDelivery
    rows: RowWriter
    data: DataDirs
    network: ServerNetwork
    config: AgentConfig
    # Servers whose files a restore holds: no start while locked.
    locks: FileLocks
    # One timer reading every server's kernel figures (None: each server
    # samples through the engine's stats API).
    stats: StatsHub | None = None
    # The histories a restarted agent reads back behind the followed consoles,
    # a few at a time (None: no bound).
    history_slots: DeferredSemaphore | None = None
