"""
A game's death and the console's last lines, on the in-memory engine: whatever
comes first (the die event, a restarted agent's re-attach, the reconcile's look
at a dead container), every line printed since the last agent's mark is
delivered once before the death is reported.

The real engines run the same class with a held re-attach step
(``test_console_kills_docker.py``); here the history read is held by the fake
engine's ``history_gate`` and time does not pass unless the test says so.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import Deferred

from ctrlagent.events import ConsoleOutput, StatusChanged
from ctrlagent.servers.lifecycle import ServerState
from tests.servers.conftest import Unit, sleep, until
from tests.servers.test_console_marks_unit import crash
from tests.servers.test_manager_unit import PARAMS

S = ServerState


def first_index(unit: Unit, wanted: object) -> int:
    """Where the first event that ``wanted`` accepts is among the events."""
    return next(i for i, e in enumerate(unit.events) if wanted(e))  # type: ignore[operator]


def once_in_order(unit: Unit, texts: list[str]) -> bool:
    """Each of ``texts`` delivered exactly once, in that order."""
    lines = unit.lines("s1")
    return (all(lines.count(text) == 1 for text in texts)
            and [lines.index(text) for text in texts] == sorted(lines.index(t) for t in texts))


def line_at(unit: Unit, text: str) -> int:
    return first_index(unit, lambda e: isinstance(e, ConsoleOutput) and text in e.lines)


def status_at(unit: Unit, current: str, after: int = 0) -> int:
    return first_index(unit, lambda e: unit.events.index(e) >= after
                       and isinstance(e, StatusChanged) and e.current == current)


async def printed_then_agent_killed(unit: Unit) -> str:
    """A running game whose agent delivered "a" and was killed; it prints "b1", "b2" after."""
    first = unit.manager()
    await first.create_server("s1", PARAMS)
    await first.start("s1")
    await until(lambda: first.get("s1").state is S.RUNNING, 2, "running")
    cid = first.get("s1").container_id or ""
    unit.engine.print(cid, "a")
    await until(lambda: "a" in unit.lines("s1"), 2, "a delivered")
    await crash(first)
    unit.engine.print(cid, "b1")
    unit.engine.print(cid, "b2")
    return cid


@pytest_twisted.ensureDeferred
async def test_a_death_while_the_restarted_agent_reads_the_history_waits_for_its_last_lines(
    unit: Unit,
) -> None:
    cid = await printed_then_agent_killed(unit)
    unit.engine.history_gate = gate = Deferred()
    second = unit.manager()
    server = second.get("s1")
    await until(lambda: server.container_id == cid, 2, "reconcile reading the history")
    await sleep(0.05)
    seen = len(unit.events)
    unit.engine.die(cid, 137, external_kill=True)
    await sleep(0.1)
    # The death is seen, but not reported while the history is read back
    # (the crash report's tail needs it); the followed console already
    # delivered the lines since the mark.
    assert server.state is S.RUNNING
    gate.callback(None)
    await until(lambda: server.state is S.OFFLINE, 2, "offline")
    assert once_in_order(unit, ["a", "b1", "b2"])
    history = server.console_history(100)
    assert [history.index(text) for text in ("a", "b1", "b2")] == sorted(
        history.index(text) for text in ("a", "b1", "b2"))
    offline = status_at(unit, "offline", after=seen)
    assert line_at(unit, "b2") < offline
    # The re-attach that saw the death did not report the dead game running again.
    await sleep(0.1)
    assert [(e.previous, e.current) for e in unit.events[seen:]
            if isinstance(e, StatusChanged)] == [("running", "offline")]
    assert not server.console.stdin_connected and not server.output_attached


@pytest_twisted.ensureDeferred
async def test_a_game_found_dead_by_a_restarted_agent_has_its_last_lines_delivered_first(
    unit: Unit,
) -> None:
    cid = await printed_then_agent_killed(unit)
    unit.engine.die(cid, 137, external_kill=True)
    unit.clock.advance(1)  # the new agent's events begin after the death
    seen = len(unit.events)
    second = unit.manager()
    # It should run: started again, after the dead run's last lines.
    await until(lambda: second.get("s1").state is S.RUNNING and second.reconciled > 0, 2,
                "started again")
    assert once_in_order(unit, ["a", "b1", "b2"])
    assert line_at(unit, "b2") < status_at(unit, "starting", after=seen)


@pytest_twisted.ensureDeferred
async def test_one_death_reported_twice_is_judged_once(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    server = m.get("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running")
    cid = server.container_id or ""
    seen = len(unit.events)
    # The die event and a kill's own look at the dead container (past the kill's
    # grace) both report it while the console reads its last lines.
    unit.engine.history_gate = gate = Deferred()
    server.exits.expect()
    unit.engine.die(cid, 137)
    await sleep(0.05)
    second_report = Deferred.fromCoroutine(server.on_exit(137, oom=False))
    gate.callback(None)
    await second_report
    await until(lambda: server.state is S.OFFLINE, 2, "offline")
    await sleep(0.05)
    assert [(e.previous, e.current) for e in unit.events[seen:]
            if isinstance(e, StatusChanged)] == [("running", "offline")]
    assert server.crash_report is None


@pytest_twisted.ensureDeferred
async def test_a_container_gone_before_the_last_lines_are_read_ends_the_catch_up_quietly(
    unit: Unit,
) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    console = m.get("s1").console
    # The in-memory engine raises NotFound at once for a container it does not
    # have (the real engines raise their EngineError kind later, from the stream).
    assert await console._read_rest("no-such-container", console._attach_epoch, 1.0) is True
