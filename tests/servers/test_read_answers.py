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


def same_answers(m: ServerManager, dispatcher: Dispatcher, name: str) -> int:
    """Both reads of ``name`` through both paths; the number answered from a kept answer."""
    kept = 0
    for action in READS:
        before = m.reads.filled
        mine = m.read_answer(action, name)
        theirs = registry_answer(dispatcher, action, name)
        if mine is not None:
            assert mine == theirs, action
            assert m.reads.filled == before + 1
            kept += 1
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
    assert same_answers(m, dispatcher, "s1") == 2
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    unit.clock.advance(0.5)
    # Running: the time moves, the figures are sampled (fresh, then stale).
    for step in (0.25, 0.5, 3.0, 0.001, 7.5):
        unit.clock.advance(step)
        assert same_answers(m, dispatcher, "s1") == 2
    made = m.reads.made
    unit.clock.advance(0.1)
    assert same_answers(m, dispatcher, "s1") == 2
    assert m.reads.made == made, "a read between two samples makes no new answer"
    # A new name and an alias: a new definition, the alias reads the same server.
    await m.update("s1", {"name": "Renamed server", "aliases": ["panel-7"]})
    assert same_answers(m, dispatcher, "s1") == 2
    assert b"Renamed server" in m.read_answer(reads.STATUS, "s1")  # type: ignore[operator]
    assert same_answers(m, dispatcher, "panel-7") == 2
    # A crash: the state, the crash report.
    server = m.get("s1")
    assert server.container_id is not None
    unit.engine.die(server.container_id, 3)
    await until(lambda: m.get("s1").state is not S.RUNNING, 2, "crashed")
    unit.clock.advance(0.2)
    assert same_answers(m, dispatcher, "s1") == 2
    # Stopped.
    await until(lambda: m.get("s1").power is None, 5, "the crash handled")
    if m.get("s1").state is not S.OFFLINE:
        await m.stop("s1")
        unit.clock.advance(10)
        await until(lambda: m.get("s1").state is S.OFFLINE, 5, "offline")
    assert same_answers(m, dispatcher, "s1") == 2


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
async def test_a_name_holding_the_templates_time_is_not_kept(unit: Unit) -> None:
    # The first time a template is made at, in a name: cutting there would
    # put the time of each read in the name; the check against the second
    # rendering refuses the template, and the registry answers.
    m, dispatcher = rig(unit)
    stamp = "2100-01-01T00:00:00.125Z"
    await m.create_server("s1", {**PARAMS, "name": "built " + stamp})
    assert m.read_answer(reads.STATUS, "s1") is None
    assert stamp.encode() in registry_answer(dispatcher, reads.STATUS, "s1")


@pytest_twisted.ensureDeferred
async def test_an_uptime_under_a_millisecond_is_the_registrys(unit: Unit) -> None:
    m, dispatcher = rig(unit)
    await m.create_server("s1", dict(PARAMS))
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    server = m.get("s1")
    server.started_at = unit.clock.seconds() - 0.0004
    assert m.read_answer(reads.STATUS, "s1") is None
    server.started_at = unit.clock.seconds() - 0.002
    assert same_answers(m, dispatcher, "s1") == 2


def test_a_template_cuts_where_the_time_goes() -> None:
    def answer(now: float) -> bytes:
        return encode({"name": "x", "resources": {"uptime": max(0.0, now - 100.5),
                                                  "timestamp": reads.iso_ms(now)},
                       "uptime": max(0.0, now - 100.5)})

    pieces = reads.template(answer(reads._FIRST), answer(reads._SECOND), 100.5)
    assert pieces is not None
    assert sum(1 for p in pieces if not isinstance(p, bytes)) == 3
    assert reads.fill(pieces, 1_790_000_000.25, 100.5) == answer(1_790_000_000.25)
    # A field that moves with the time some other way: not kept.
    assert reads.template(b'{"a":1}', b'{"a":2}', None) is None


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
