"""
A reconcile whose list of containers predates a power action (on the
in-memory engine): the action's container is not forgotten, nor is the run it
starts left unfollowed or started again.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from ctrlagent.engine.interface import IContainerEngine
from ctrlagent.events import StatusChanged
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from tests.servers.conftest import Unit, sleep, until
from tests.servers.test_manager_unit import PARAMS

S = ServerState


@implementer(IContainerEngine)
class Held:
    """The fake engine; its next ``list`` (answered as it was) and ``start`` wait when gated."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.list_gate: Deferred[None] | None = None
        self.start_gate: Deferred[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def list(self, labels: Any) -> Any:
        found = await self._engine.list(labels)
        gate, self.list_gate = self.list_gate, None
        if gate is not None:
            await gate
        return found

    async def start(self, cid: str) -> None:
        gate, self.start_gate = self.start_gate, None
        if gate is not None:
            await gate
        await self._engine.start(cid)


async def held_reconcile(unit: Unit) -> tuple[ServerManager, Held, Deferred[None]]:
    """A restarted manager whose first reconcile listed the containers and waits to go on."""
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.stopService()
    engine = Held(unit.engine)
    engine.list_gate = gate = Deferred()
    store = open_store(reactor, unit.config.state_dir)
    second = ServerManager(reactor, unit.config, engine, store, clock=unit.clock)
    second.add_listener(unit.events.append)
    unit.managers.append(second)
    second.startService()  # its reconcile lists s1's container (stopped) and waits
    await sleep(0.05)
    return second, engine, gate


def statuses(unit: Unit) -> list[tuple[str, str]]:
    return [(e.previous, e.current) for e in unit.events if isinstance(e, StatusChanged)]


async def followed(unit: Unit, cid: str) -> None:
    unit.engine.print(cid, "still followed")
    await until(lambda: "still followed" in unit.lines("s1"), 2, "the run followed")


@pytest_twisted.ensureDeferred
async def test_a_start_done_after_the_list_keeps_its_run_followed(unit: Unit) -> None:
    second, _, gate = await held_reconcile(unit)
    server = second.get("s1")
    cid = server.container_id or ""
    await second.start("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running")
    gate.callback(None)  # the list said "stopped"
    await until(lambda: second.reconciled > 0, 2, "reconciled")
    await sleep(0.05)
    assert server.container_id == cid and server.state is S.RUNNING and server.output_attached
    # started once: not detached and started again by the old list
    assert statuses(unit).count(("offline", "starting")) == 1
    assert ("running", "starting") not in statuses(unit)
    await followed(unit, cid)


@pytest_twisted.ensureDeferred
async def test_a_start_under_way_keeps_its_container_whatever_an_older_list_said(
    unit: Unit,
) -> None:
    engine = Held(unit.engine)
    engine.list_gate = gate = Deferred()
    store = open_store(reactor, unit.config.state_dir)
    m = ServerManager(reactor, unit.config, engine, store, clock=unit.clock)
    m.add_listener(unit.events.append)
    unit.managers.append(m)
    m.startService()  # its reconcile lists no container of s1 (not made yet) and waits
    await sleep(0.05)
    await m.create_server("s1", PARAMS)
    server = m.get("s1")
    cid = server.container_id or ""
    assert cid
    engine.start_gate = started = Deferred()
    starting = ensureDeferred(m.start("s1"))
    await sleep(0.05)
    gate.callback(None)  # the list without s1's container comes while its start is under way
    await until(lambda: m.reconciled > 0, 2, "reconciled")
    started.callback(None)
    await starting
    await until(lambda: server.state is S.RUNNING, 2, "running")
    await sleep(0.05)
    assert server.container_id == cid and server.output_attached
    assert statuses(unit).count(("offline", "starting")) == 1
    await followed(unit, cid)
