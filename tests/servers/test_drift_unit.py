"""
Unit tests of the drift check (``ctrlagent.servers.drift``) on the in-memory
engine: a game's end that no engine event told is settled at the second look,
and never judged twice.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from ctrlagent.config import AgentConfig, ConfigInvalid, ServersConfig, validate
from ctrlagent.engine.interface import ContainerState
from ctrlagent.events import ConsoleOutput, StatusChanged
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
    # The engine still tells something of the container (an operator's
    # `docker kill`, whose die is the one lost): the second look notes it
    # again instead of settling, and the third judges the death by it.
    unit.engine._event("kill", unit.engine.get(cid))
    await until(lambda: server.heard > 0, 2, "the event heard")
    await look(unit, m)
    assert server.state is S.RUNNING
    await look(unit, m)
    await until(lambda: server.state is S.OFFLINE, 2, "offline: stopped outside the agent")
    assert server.crash_report is None


@pytest_twisted.ensureDeferred
async def test_a_container_removed_unheard_is_settled_as_its_lost_events_would_have(
    unit: Unit,
) -> None:
    m, server = await running(unit)
    first = server.container_id or ""
    unit.engine.die(first, 137, silent=True)
    del unit.engine.containers[first]
    seen = len(unit.events)
    await look(unit, m)
    await look(unit, m)
    # Its kill, die and destroy were lost: heard, they read as a stop outside
    # the agent (no crash, no restart even with crashRestart on), and so does
    # their loss.
    await until(lambda: server.state is S.OFFLINE, 2, "offline: removed outside the agent")
    assert moves(unit, "s1", seen) == [("running", "offline")]
    assert server.crash_report is None
    assert unheard_ends(m) == 1
    notices = [line for e in unit.events[seen:]
               if isinstance(e, ConsoleOutput) and e.stream == "agent" for line in e.lines]
    assert any("stopped outside the agent (its container was removed)" in n
               for n in notices), notices
    # As for any stop outside the agent, the desired state stays (an agent
    # restart brings it back); the gone container is forgotten.
    assert server.desired == "running" and server.container_id is None
    # The next start makes a new container.
    await m.start("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running again")
    assert server.container_id not in (None, first)


@pytest_twisted.ensureDeferred
async def test_a_crash_pruned_between_the_looks_is_still_judged_a_crash(unit: Unit) -> None:
    m, server = await running(unit)  # crashRestart on
    first = server.container_id or ""
    unit.engine.die(first, 3, silent=True)
    await look(unit, m)  # listed exited (3)
    del unit.engine.containers[first]  # a prune of stopped containers
    await look(unit, m)

    await until(lambda: server.crash_report is not None, 2, "the crash judged")
    assert server.crash_report is not None and server.crash_report.exit_code == 3
    await until(lambda: server.state is S.RUNNING and server.container_id not in (None, first),
                2, "restarted by its crash policy, in a new container")


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


@pytest_twisted.ensureDeferred
async def test_stopping_while_a_look_waits_for_the_engine_ends_it_quietly(
    unit: Unit, fail_on_logged_errors: list[dict],
) -> None:
    m, _ = await running(unit)
    gate: Deferred[None] = Deferred()
    asked: list[bool] = []
    real = unit.engine.list

    async def held_list(labels: Any) -> list[ContainerState]:
        asked.append(True)
        await gate
        return await real(labels)

    unit.engine.list = held_list  # type: ignore[method-assign]
    unit.clock.advance(INTERVAL)
    await until(lambda: bool(asked), 2, "a look asking the engine")
    await m.stopService()
    # The look was the manager's work: cancelled, and over before the engine
    # and the store close, not left to run after them.
    assert gate.called
    assert not m.drift.running
    gc.collect()  # an unhandled failure is logged when its Deferred is collected
    await sleep(0)
    assert fail_on_logged_errors == []


@pytest_twisted.ensureDeferred
async def test_a_settle_under_way_is_not_started_twice_and_a_late_die_wins(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    seen = len(unit.events)
    cid = server.container_id or ""
    unit.engine.die(cid, 3, silent=True)
    await look(unit, m)
    # The settle's inspect is slow; the die event comes while it waits.
    gate: Deferred[None] = Deferred()
    inspects: list[str] = []
    real = unit.engine.inspect

    async def held_inspect(cid: str) -> ContainerState:
        inspects.append(cid)
        if len(inspects) == 1:
            await gate
        return await real(cid)

    unit.engine.inspect = held_inspect  # type: ignore[method-assign]
    await look(unit, m)
    await until(lambda: len(inspects) == 1, 2, "the settle's inspect")
    # Looks while it waits (one notes the server again, the next would
    # settle it): no second settle.
    await look(unit, m)
    await look(unit, m)
    assert len(inspects) == 1
    unit.engine._event("die", unit.engine.get(cid), 3)
    await until(lambda: server.state is S.CRASHED, 2, "crashed by the late event")
    gate.callback(None)
    await sleep(0.05)
    assert moves(unit, "s1", seen) == [("running", "crashed")]
    assert unheard_ends(m) == 0


@pytest_twisted.ensureDeferred
async def test_a_container_still_stopping_is_not_taken_for_ended(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    cid = server.container_id or ""
    unit.engine.die(cid, 0, silent=True)
    # Podman says so of a container an outside `podman stop -t 300` is
    # stopping: not running, not ended.
    unit.engine.get(cid).status = "stopping"
    for _ in range(3):
        await look(unit, m)
    assert server.state is S.RUNNING
    unit.engine.get(cid).status = "exited"
    await look(unit, m)
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed once it ended")


@pytest_twisted.ensureDeferred
async def test_crashes_found_late_still_trip_the_crash_loop_guard(unit: Unit) -> None:
    m, server = await running(unit)  # crash_restart on, a window of 30 s
    first = server.container_id or ""
    unit.engine.die(first, 1, silent=True)
    await look(unit, m)
    await look(unit, m)
    await until(lambda: server.container_id is not None and server.state is S.RUNNING
                and unit.engine.get(server.container_id).running, 2, "restarted once")
    # The new run crashes at once, its event lost too: judged two looks
    # (120 s) after the first judgement, yet only a moment after the restart.
    unit.engine.die(server.container_id or "", 1, silent=True)
    await look(unit, m)
    await look(unit, m)
    await until(lambda: server.state is S.CRASHED, 2, "crashed again")
    assert server.crash_report is not None and not server.crash_report.restarted
    assert server.desired == "offline"


@pytest_twisted.ensureDeferred
async def test_a_server_deleted_during_the_settle_is_left_alone(unit: Unit) -> None:
    m, server = await running(unit, crash_restart=False)
    seen = len(unit.events)
    unit.engine.die(server.container_id or "", 3, silent=True)
    await look(unit, m)
    gate: Deferred[None] = Deferred()
    real = unit.engine.inspect
    asked: list[str] = []

    async def held_inspect(cid: str) -> ContainerState:
        asked.append(cid)
        await gate
        return await real(cid)

    unit.engine.inspect = held_inspect  # type: ignore[method-assign]
    await look(unit, m)
    await until(lambda: bool(asked), 2, "the settle's inspect")
    server.retired = True  # a delete finished meanwhile (the Panel was told)
    gate.callback(None)
    await sleep(0.05)
    assert moves(unit, "s1", seen) == []
    assert unheard_ends(m) == 0
