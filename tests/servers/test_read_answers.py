"""
Status and metrics reads answered from each server's kept answer
(``servers/reads.py``, ``ServerManager.read_answer``).

The registry is the reference: at every step of a server's life (created,
starting, running with fresh and stale samples, renamed, given an alias,
crashed, stopped), the kept answer and the registry's answer to the same
read at the same time are the same bytes; and the kept path was the one
taken, not a None that sends every read to the registry.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from ctrlagent.actions import Dispatcher
from ctrlagent.servers import reads
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.server import Server
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.wire import http as envelopes
from ctrlagent.wire.command import ActionResult, Command
from ctrlagent.wire.json import encode
from tests.actions.rig import FakeHost
from tests.servers.conftest import Unit, until

S = ServerState
PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}
READS = (reads.STATUS, reads.METRICS)


def registry_answer(dispatcher: Dispatcher, action: str, server_id: str) -> bytes:
    """The read's answer through the registry, encoded as the API writes it."""
    work = dispatcher.dispatch(Command(action, server_id, {}))
    result = work.result
    assert isinstance(result, ActionResult), result
    return encode(envelopes.success(result))


def same_answers(m: ServerManager, dispatcher: Dispatcher, name: str, clock: Any) -> int:
    """
    Both reads of ``name`` through both paths, three times 5 ms apart (a
    rendering, a rendering that makes the template, a fill); the number of
    reads the manager answered (not None), and every one the registry's bytes.
    """
    kept = 0
    for _ in range(3):
        for action in READS:
            mine = m.read_answer(action, name)
            theirs = registry_answer(dispatcher, action, name)
            if mine is not None:
                assert mine == theirs, action
                kept += 1
        clock.advance(0.005)
    return kept


def rig(unit: Unit) -> tuple[ServerManager, Dispatcher]:
    m = unit.manager()
    dispatcher = Dispatcher(
        servers=m, files=FakeFileManager(unit.clock), system=FakeHost(), clock=unit.clock
    )
    return m, dispatcher


@pytest_twisted.ensureDeferred
async def test_kept_answers_are_the_registrys_through_a_servers_life(unit: Unit) -> None:
    m, dispatcher = rig(unit)
    await m.create_server("s1", dict(PARAMS))
    assert same_answers(m, dispatcher, "s1", unit.clock) == 6
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    unit.clock.advance(0.5)
    # Running: the time moves, the figures are sampled (fresh, then stale).
    for step in (0.25, 0.5, 3.0, 0.001, 7.5):
        unit.clock.advance(step)
        assert same_answers(m, dispatcher, "s1", unit.clock) == 6
    # Between two samples: only fills.
    made, filled = m.reads.made, m.reads.filled
    unit.clock.advance(0.1)
    assert same_answers(m, dispatcher, "s1", unit.clock) == 6
    assert m.reads.made == made, "a read between two samples makes no new template"
    assert m.reads.filled == filled + 6
    # A new name and an alias: a new definition, the alias reads the same server.
    await m.update("s1", {"name": "Renamed server", "aliases": ["panel-7"]})
    assert same_answers(m, dispatcher, "s1", unit.clock) == 6
    assert b"Renamed server" in m.read_answer(reads.STATUS, "s1")  # type: ignore[operator]
    assert same_answers(m, dispatcher, "panel-7", unit.clock) == 6
    # A crash: the state, the crash report.
    server = m.get("s1")
    assert server.container_id is not None
    unit.engine.die(server.container_id, 3)
    await until(lambda: m.get("s1").state is not S.RUNNING, 2, "crashed")
    unit.clock.advance(0.2)
    assert same_answers(m, dispatcher, "s1", unit.clock) == 6
    # Stopped.
    await until(lambda: m.get("s1").power is None, 5, "the crash handled")
    if m.get("s1").state is not S.OFFLINE:
        await m.stop("s1")
        unit.clock.advance(10)
        await until(lambda: m.get("s1").state is S.OFFLINE, 5, "offline")
    assert same_answers(m, dispatcher, "s1", unit.clock) == 6


@pytest_twisted.ensureDeferred
async def test_a_read_the_manager_does_not_keep_goes_to_the_registry(unit: Unit) -> None:
    m, _ = rig(unit)
    await m.create_server("s1", dict(PARAMS))
    assert m.read_answer("list_servers", "s1") is None
    assert m.read_answer("server_status", "s1") is None, "a legacy name: the registry's"
    assert m.read_answer(reads.STATUS, "nope") is None
    container = "ctrl-alt-play-s1"
    assert m.resolve(container) == "s1"
    assert m.read_answer(reads.STATUS, container) is None


@pytest_twisted.ensureDeferred
async def test_a_name_holding_the_time_of_a_read_is_not_kept(unit: Unit) -> None:
    # The first read's time, in a name: cutting there would put the time of
    # each read in the name; the check against the second rendering refuses
    # the template, and the registry answers from then on.
    m, dispatcher = rig(unit)
    stamp = reads.iso_ms(unit.clock.seconds())
    await m.create_server("s1", {**PARAMS, "name": "built " + stamp})
    first = m.read_answer(reads.STATUS, "s1")
    assert first == registry_answer(dispatcher, reads.STATUS, "s1")
    unit.clock.advance(0.01)
    second = m.read_answer(reads.STATUS, "s1")
    assert second == registry_answer(dispatcher, reads.STATUS, "s1")
    unit.clock.advance(0.01)
    assert m.read_answer(reads.STATUS, "s1") is None
    assert stamp.encode() in registry_answer(dispatcher, reads.STATUS, "s1")
    assert m.reads.filled == 0


@pytest_twisted.ensureDeferred
async def test_two_reads_in_the_same_millisecond_make_no_template(unit: Unit) -> None:
    m, _ = rig(unit)
    await m.create_server("s1", dict(PARAMS))
    for _ in range(3):
        assert m.read_answer(reads.STATUS, "s1") is not None
        unit.clock.advance(0.0005)
    assert m.reads.made == 0
    unit.clock.advance(0.002)
    m.read_answer(reads.STATUS, "s1")
    assert m.reads.made == 1


def test_a_template_cuts_where_the_time_goes() -> None:
    def answer(now: float) -> bytes:
        return encode({"name": "x", "resources": {"uptime": max(0.0, now - 100.5),
                                                  "timestamp": reads.iso_ms(now)},
                       "uptime": max(0.0, now - 100.5)})

    first, second = 1_790_000_000.125, 1_790_000_003.5
    pieces = reads.template(answer(first), first, answer(second), second, 100.5)
    assert pieces is not None
    assert sum(1 for p in pieces if not isinstance(p, bytes)) == 3
    assert reads.fill(pieces, 1_790_000_007.25, 100.5) == answer(1_790_000_007.25)
    # An uptime under a millisecond, or absurdly long, is not filled (not
    # every JSON encoder writes it alike): the registry answers.
    assert reads.fill(pieces, 100.5005, 100.5) is None
    assert reads.fill(pieces, 2e15, 100.5) is None
    # A field that moves with the time some other way: not kept.
    assert reads.template(b'{"a":1}', first, b'{"a":2}', second, None) is None


class _Recording(Server):
    """A ``Server`` that notes the names of the attributes read on it."""

    def __getattribute__(self, name: str) -> Any:
        seen = object.__getattribute__(self, "__dict__").get("_seen")
        if seen is not None:
            seen.add(name)
        return object.__getattribute__(self, name)


def _reads_of(server: Server, work: Any) -> set[str]:
    server.__dict__["_seen"] = seen = set()
    try:
        work()
    finally:
        del server.__dict__["_seen"]
    return seen


@pytest.mark.parametrize("state", ["offline", "running"])
@pytest_twisted.ensureDeferred
async def test_the_key_holds_every_attribute_status_and_metrics_read(
    unit: Unit, state: str
) -> None:
    m, _ = rig(unit)
    await m.create_server("s1", dict(PARAMS))
    if state == "running":
        await m.start("s1")
        await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    server = m.get("s1")
    server.__class__ = _Recording
    try:
        now = unit.clock.seconds()
        shown = _reads_of(server, lambda: (server.status((), now), server.metrics(now)))
        keyed = _reads_of(server, server.read_key)
    finally:
        server.__class__ = Server
    # The constants and the ways in (the sampler is read through ``stats``).
    shown -= {"server_id", "services", "sampler", "status", "metrics", "__class__", "__dict__"}
    assert shown <= keyed, shown - keyed
