"""
Unit tests of the drift check (``ctrlagent.servers.drift``) on the in-memory
engine: a game's end that no engine event told is settled at the second look,
and never judged twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ctrlagent.config import AgentConfig, ConfigInvalid, ServersConfig, validate
from ctrlagent.engine.interface import ContainerState
from ctrlagent.events import StatusChanged
from ctrlagent.metrics import AgentMetrics
from ctrlagent.servers.lifecycle import ServerState as S
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.server import Server
from tests.servers.conftest import Unit, sleep, until

PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}
INTERVAL = 60.0


async def running(unit: Unit, sid: str = "s1", **params: Any) -> tuple[ServerManager, Server]:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       drift_check_interval=INTERVAL))
    m = unit.manager()
    await m.create_server(sid, {**PARAMS, **params})
    await m.start(sid)
    server = m.get(sid)
    await until(lambda: server.state is S.RUNNING, 2, "running")
    await until(lambda: m.reconciled >= 1, 2, "the first reconcile")
    return m, server


async def look(unit: Unit, m: ServerManager) -> None:
    """Advance to the next look and let it finish."""
    looks = m.drift.looks
    unit.clock.advance(INTERVAL)
    await until(lambda: m.drift.looks > looks, 2, "a look")
    await sleep(0.05)


def moves(unit: Unit, sid: str, since: int) -> list[tuple[str, str]]:
    return [(e.previous, e.current) for e in unit.events[since:]
            if isinstance(e, StatusChanged) and e.server_id == sid]


@pytest_twisted.ensureDeferred
async def test_a_death_whose_event_was_lost_is_judged_at_the_second_look(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    seen = len(unit.events)
    unit.engine.die(server.container_id or "", 3, silent=True)
    await sleep(0.05)
    assert server.state is S.RUNNING  # nothing told the agent
    await look(unit, m)
    assert server.state is S.RUNNING  # noted, not acted on
    assert "s1" in m.drift.noted
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed")
    assert moves(unit, "s1", seen) == [("running", "crashed")]
    assert server.crash_report is not None
    assert server.crash_report.exit_code == 3
    assert m.drift.noted == {}
    assert unheard_ends(m) == 1


def unheard_ends(m: ServerManager) -> float:
    """The counter as a scrape of the agent's metrics reads it."""
    metrics = AgentMetrics()
    metrics.watch_servers(m)
    text = generate_latest(metrics.registry).decode()
    return next(s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "ctrlagent_engine_unheard_ends_total")


@pytest_twisted.ensureDeferred
async def test_a_lost_death_follows_the_crash_policy_as_the_event_would(unit: Unit) -> None:
    m, server = await running(unit)
    first = server.container_id
    starts = unit.engine.starts
    unit.engine.die(first or "", 1, silent=True)
    await look(unit, m)
    await look(unit, m)
    await until(lambda: unit.engine.starts > starts and server.state is S.RUNNING, 2,
                "restarted by the crash policy")
    # The new run is followed, and never noted as drifted.
    await look(unit, m)
    assert m.drift.noted == {}
    assert server.state is S.RUNNING


@pytest_twisted.ensureDeferred
async def test_a_late_die_between_the_looks_is_judged_once(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    seen = len(unit.events)
    cid = server.container_id or ""
    unit.engine.die(cid, 3, silent=True)
    await look(unit, m)
    assert "s1" in m.drift.noted
    # The event was only late: it comes between the looks.
    unit.engine._event("die", unit.engine.get(cid), 3)
    await until(lambda: server.state is S.CRASHED, 2, "crashed by the event")
    await look(unit, m)
    await look(unit, m)
    assert moves(unit, "s1", seen) == [("running", "crashed")]
    assert unheard_ends(m) == 0


@pytest_twisted.ensureDeferred
async def test_any_event_between_the_looks_puts_off_the_settling(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    cid = server.container_id or ""
    unit.engine.die(cid, 3, silent=True)
    await look(unit, m)
    # Something is still heard of the container (a stale event, say): the
    # second look notes it again instead of settling.
    unit.engine._event("exec_die", unit.engine.get(cid))
    await until(lambda: server.heard > 0, 2, "the event heard")
    await look(unit, m)
    assert server.state is S.RUNNING
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed")


@pytest_twisted.ensureDeferred
async def test_a_container_removed_unheard_is_reconciled_as_an_agent_start_finds_it(
    unit: Unit,
) -> None:
    m, server = await running(unit, crash_restart=False)
    first = server.container_id or ""
    unit.engine.die(first, 137, silent=True)
    del unit.engine.containers[first]
    await look(unit, m)
    await look(unit, m)
    # Wanted running: started again in a new container, as a reconcile does.
    await until(lambda: server.container_id not in (None, first) and server.state is S.RUNNING,
                2, "a new container running")


@pytest_twisted.ensureDeferred
async def test_a_power_action_under_way_is_left_to_itself(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    # An action holds the server (a restart waiting on the engine, say): it
    # owns the server's state while it runs, and settles the death itself.
    server.slot.claim("restart")
    unit.engine.die(server.container_id or "", 3, silent=True)
    await look(unit, m)
    await look(unit, m)
    assert m.drift.noted == {}
    assert server.state is S.RUNNING
    server.slot.release()
    # Once it is over, a death it left unsettled is caught as any other.
    await look(unit, m)
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed")


@pytest_twisted.ensureDeferred
async def test_no_look_while_the_engine_is_lost(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    unit.engine.die(server.container_id or "", 3, silent=True)
    await look(unit, m)
    assert "s1" in m.drift.noted
    m.engine_up = False
    unit.clock.advance(INTERVAL)
    await sleep(0.05)
    assert m.drift.noted == {}  # forgotten: the reconcile on the engine's return settles it
    assert server.state is S.RUNNING


@pytest_twisted.ensureDeferred
async def test_an_engine_that_fails_the_list_changes_nothing(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    unit.engine.die(server.container_id or "", 3, silent=True)
    await look(unit, m)

    async def failing_list(labels: Any) -> list[ContainerState]:
        from ctrlagent.errors import EngineUnavailable
        raise EngineUnavailable("the engine hung up")

    real = unit.engine.list
    unit.engine.list = failing_list  # type: ignore[method-assign]
    unit.clock.advance(INTERVAL)
    await sleep(0.05)
    assert server.state is S.RUNNING
    assert "s1" in m.drift.noted  # kept for the next look that answers
    unit.engine.list = real  # type: ignore[method-assign]
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed")


@pytest_twisted.ensureDeferred
async def test_running_servers_are_never_noted(unit: Unit) -> None:
    m, server = await running(unit)
    for _ in range(3):
        await look(unit, m)
    assert m.drift.noted == {}
    assert server.state is S.RUNNING


@pytest_twisted.ensureDeferred
async def test_an_interval_of_zero_never_looks(unit: Unit) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       drift_check_interval=0.0))
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    server = m.get("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running")
    unit.engine.die(server.container_id or "", 3, silent=True)
    for _ in range(3):
        unit.clock.advance(INTERVAL)
        await sleep(0.02)
    assert m.drift.looks == 0
    assert server.state is S.RUNNING


@pytest.mark.parametrize("value", [-1.0, 3601.0])
def test_the_interval_is_checked(value: float) -> None:
    config = AgentConfig(development=True,
                         servers=ServersConfig(drift_check_interval=value))
    with pytest.raises(ConfigInvalid, match="servers.drift_check_interval"):
        validate(config)
