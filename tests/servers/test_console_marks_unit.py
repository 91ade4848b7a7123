"""
Console marks on the in-memory engine: lines are handed on in the same turn
as the store write recording them is issued, so an agent crash at any moment
(the last issued write completes, nothing after it happens) neither loses
nor repeats a line; one console stream delivers at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.server import MarkFilter
from ctrlagent.servers.states import ServerState
from ctrlagent.servers.store import ServerStore, open_store
from tests.servers.conftest import Unit, sleep, until
from tests.servers.test_manager_unit import PARAMS

S = ServerState


class GatedStore:
    """
    The real store, whose console-mark writes are done at once but reported
    done only when the test opens the gate: a write "in flight" for as long
    as a test needs.  Closing (a crash, a stop) opens the gate.
    """

    def __init__(self, real: ServerStore) -> None:
        self.real = real
        self.gate: Deferred[None] | None = None
        self.issued: list[tuple[list[Any], int]] = []  # (changes, events seen at issue)
        self.events: list[Any] = []

    def hold(self) -> None:
        self.gate = Deferred()

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.callback(None)

    def update_many(self, changes: list[Any]) -> Deferred[None]:
        self.issued.append((changes, len(self.events)))
        done = self.real.update_many(changes)
        if self.gate is None:
            return done
        gate = self.gate
        return gatherResults([done, gate]).addCallback(lambda _: None)  # type: ignore[return-value]

    def close(self) -> Deferred[None]:
        self.release()
        return self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest_twisted.async_yield_fixture
async def gated(unit: Unit) -> AsyncIterator[Unit]:
    """``unit``, whose gated stores are opened before its managers stop."""
    yield unit
    for store in GATED:
        store.release()
    GATED.clear()


GATED: list[GatedStore] = []


def gated_manager(unit: Unit) -> tuple[ServerManager, GatedStore]:
    from twisted.internet import reactor

    store = GatedStore(open_store(reactor, unit.config.state_dir))
    GATED.append(store)
    m = ServerManager(reactor, unit.config, unit.engine, store, clock=unit.clock)  # type: ignore[arg-type]
    m.add_listener(unit.events.append)
    m.add_listener(store.events.append)
    m.startService()
    unit.managers.append(m)
    return m, store


def said(unit: Unit) -> list[str]:
    return [line for line in unit.lines("s1") if line.startswith("[Server]")]


def issued_mark(store: GatedStore, sid: str) -> int:
    """The latest console mark whose write was issued (0 when none)."""
    marks = [fields["console_mark"] for changes, _ in store.issued
             for server_id, fields in changes if server_id == sid]
    return max(marks, default=0)


def printed(unit: Unit, cid: str) -> list[tuple[int, str]]:
    """What the engine's log holds: (nanosecond, text)."""
    from ctrlagent.servers.console import split_timestamp

    container = [c for c in unit.engine.containers.values() if c.cid == cid][0]
    return [split_timestamp(raw) for _, raw in container.log]


@pytest_twisted.ensureDeferred
async def test_lines_go_out_in_the_turn_their_marks_write_is_issued_never_later(
    gated: Unit,
) -> None:
    unit = gated
    m, store = gated_manager(unit)
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    cid = m.get("s1").container_id or ""

    def covered_by_issued_writes() -> list[str]:
        mark = issued_mark(store, "s1")
        return [text for ns, text in printed(unit, cid) if ns <= mark]

    store.hold()
    for word in ("one", "two", "three"):
        unit.engine.stdin(cid, "say " + word)
        for _ in range(3):
            await sleep(0.01)
            # at every turn: delivered = exactly what the issued writes record
            assert unit.lines("s1") == covered_by_issued_writes()
    # with the first write held in flight, later lines wait for the next one
    assert len(unit.lines("s1")) < len(printed(unit, cid))
    store.release()
    await until(lambda: len(unit.lines("s1")) == len(printed(unit, cid)), 2, "the rest")
    assert unit.lines("s1") == covered_by_issued_writes() == [t for _, t in printed(unit, cid)]
    assert said(unit) == ["[Server] one", "[Server] two", "[Server] three"]


@pytest_twisted.ensureDeferred
async def test_a_crash_with_a_mark_write_in_flight_neither_loses_nor_repeats_a_line(
    gated: Unit,
) -> None:
    unit = gated
    m, store = gated_manager(unit)
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    cid = m.get("s1").container_id or ""
    await until(lambda: not m._writing, 2, "quiet")
    store.hold()
    writes = len(store.issued)
    unit.engine.stdin(cid, "say in-flight")
    unit.engine.stdin(cid, "say queued")
    await until(lambda: len(store.issued) > writes, 2, "a write in flight")
    await sleep(0.05)
    # a write is in flight (its lines are out), newer lines wait behind it
    assert m._writing and 0 < len(unit.lines("s1")) < len(printed(unit, cid))
    m.simulate_crash()  # the issued write completes; nothing more happens
    assert m.crashed is not None
    await m.crashed
    unit.engine.stdin(cid, "say while-down")
    second = unit.manager()
    await until(lambda: "[Server] while-down" in said(unit), 2, "recovered")
    await sleep(0.05)
    assert unit.lines("s1") == [text for _, text in printed(unit, cid)]
    assert said(unit) == ["[Server] in-flight", "[Server] queued", "[Server] while-down"]
    assert second.console_history("s1", 10) == unit.lines("s1")


@pytest_twisted.ensureDeferred
async def test_an_attach_overtaken_while_reading_history_delivers_nothing(unit: Unit) -> None:
    first = unit.manager()
    await first.create_server("s1", PARAMS)
    await first.start("s1")
    await until(lambda: first.get("s1").state is S.RUNNING, 2, "running")
    cid = first.get("s1").container_id or ""
    unit.engine.stdin(cid, "say before")
    await until(lambda: "[Server] before" in said(unit), 2, "before")
    await sleep(0.05)
    first.simulate_crash()
    await first.crashed  # type: ignore[misc]

    unit.engine.history_gate = gate = Deferred()
    second = unit.manager()
    server = second.get("s1")
    await until(lambda: second.reconciled == 0 and unit.engine.history_gate is gate
                and server.container_id == cid, 2, "reconcile reading history")
    await sleep(0.05)
    assert not server.output_attached  # still reading the history
    # a start (say, the Panel's) attaches meanwhile
    await second.start("s1")
    assert server.output_attached
    gate.callback(None)  # the overtaken attach resumes, and must give up
    await until(lambda: second.reconciled > 0, 2, "reconciled")
    unit.engine.stdin(cid, "say after")
    await until(lambda: "[Server] after" in said(unit), 2, "after")
    await sleep(0.05)
    assert said(unit) == ["[Server] before", "[Server] after"]
    followers = [c for c in unit.engine.containers.values() if c.cid == cid][0].followers
    assert len([f for f in followers if not f.ended]) == 1


@pytest_twisted.ensureDeferred
async def test_history_holds_exactly_the_lines_the_mark_covers(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    server = m.get("s1")
    base = "2026-11-18T11:06:40.000000100Z "
    server.history_lines(
        [("stdout", base + "a"), ("stdout", base + "b"),
         ("stdout", "2026-11-18T11:06:40.000000099Z old"),
         ("stdout", "2026-11-18T11:06:40.000000101Z new")],
        MarkFilter(1_795_000_000_000_000_100, 1),
    )
    # "b" shares the mark's nanosecond beyond its count: it comes again, live
    assert m.console_history("s1", 10) == ["a", "old"]

