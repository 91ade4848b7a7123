"""
Console marks on the in-memory engine (``ctrlagent.servers.delivery``).

``HoldingLink`` plays the Panel link as the manager's acknowledging consumer:
it holds the events it was given (frames written, not yet taken by the
kernel) until the test "drains" some of them, which is the moment the Panel
receives them and their receipts are settled.  A ``simulate_crash`` then is a
SIGKILL at any step: what the link held dies with the process, what was
settled is in the journal (page-cache writes survive a SIGKILL), and the
store keeps its last commit.

The one step a test in one process cannot split is between the kernel taking
a frame and the journal record of its receipt: both happen in one Python call
(``_Drain.resumeProducing`` settles, the manager writes the journal), so a
crash lands before both or after both.  ``delivery``'s docstring says what a
SIGKILL landing between the two system calls does (a repeat, never a loss).
"""

from __future__ import annotations

import binascii
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from ctrlagent.config import AgentConfig, ServersConfig, validate
from ctrlagent.engine.interface import LogLine
from ctrlagent.errors import ConfigInvalid
from ctrlagent.events import ConsoleOutput
from ctrlagent.interfaces import IConsoleConsumer
from ctrlagent.servers import delivery
from ctrlagent.servers.console import HISTORY_READ_SECONDS, MarkFilter
from ctrlagent.servers.delivery import JOURNAL_NAME, MarkJournal, encode_record, parse_journal
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import HISTORY_READS, ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.testing.engine import FakeStream
from tests.servers.conftest import Unit, sleep, until
from tests.servers.test_manager_unit import PARAMS

S = ServerState


@implementer(IConsoleConsumer)
class HoldingLink:
    """An acknowledging consumer: what it drains reached the Panel (``received``)."""

    def __init__(self, received: list[str]) -> None:
        self.received = received
        self.held: list[ConsoleOutput] = []

    def __call__(self, event: object) -> None:
        if isinstance(event, ConsoleOutput):
            self.held.append(event)

    def lines_held(self) -> int:
        return sum(len(e.lines) for e in self.held)

    def drain(self, events: int | None = None) -> None:
        """The kernel takes the first ``events`` held events (all by default), in order."""
        count = len(self.held) if events is None else events
        taken, self.held = self.held[:count], self.held[count:]
        for event in taken:
            self.received.extend(line for line in event.lines if not line.startswith("[ctrlagent]"))
            if event.receipt is not None:
                event.receipt()

    def die(self) -> None:
        """The process is SIGKILLed: frames not taken are gone."""
        self.held.clear()


def start_manager(unit: Unit, link: Any) -> ServerManager:
    store = open_store(reactor, unit.config.state_dir)
    m = ServerManager(reactor, unit.config, unit.engine, store, clock=unit.clock)
    m.add_listener(link)
    m.startService()
    unit.managers.append(m)
    return m


async def crash(m: ServerManager) -> None:
    m.simulate_crash()
    assert m.crashed is not None
    await m.crashed


def journal_path(unit: Unit) -> str:
    return os.path.join(unit.config.state_dir, JOURNAL_NAME)


def journal(unit: Unit) -> dict[str, tuple[int, int]]:
    return MarkJournal(journal_path(unit)).load()


def stored_mark(unit: Unit, sid: str) -> int:
    store = open_store(reactor, unit.config.state_dir)
    try:
        return next(r.console_mark for r in store.load() if r.server_id == sid)
    finally:
        store.close_now()


def engine_texts(unit: Unit, cid: str) -> list[tuple[int, str]]:
    container = [c for c in unit.engine.containers.values() if c.cid == cid][0]
    return [(line.ns, line.text) for line in container.log]


def burst(unit: Unit, cid: str, lines: list[tuple[str, str]]) -> None:
    """Print ``(stream, text)`` lines that the manager reads in one batch."""
    container = [c for c in unit.engine.containers.values() if c.cid == cid][0]
    followers, container.followers = container.followers, []
    for stream, text in lines:
        unit.engine.print(cid, text, stream)
    container.followers = followers
    new = container.log[-len(lines):]
    for follower in followers:
        follower.items.extend(new)
        follower._wake()


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The text of every warning logged during the test."""
    seen: list[str] = []

    def observer(event: dict) -> None:
        if event.get("log_level") is LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


async def running_with(unit: Unit, link: Any) -> tuple[ServerManager, str]:
    m = start_manager(unit, link)
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    return m, m.get("s1").container_id or ""


# -- the ledger ------------------------------------------------------------------------------


def test_receipts_settled_out_of_order_advance_the_mark_over_the_settled_prefix_only() -> None:
    advanced: list[tuple[str, tuple[int, int]]] = []
    ledger = delivery.MarkLedger(lambda sid, mark: advanced.append((sid, mark)))
    first = ledger.expect("a", (10, 1))
    second = ledger.expect("a", (20, 1))
    third = ledger.expect("a", (20, 2))
    other = ledger.expect("b", (5, 1))
    third()
    second()
    assert advanced == []  # the first is not delivered: nothing after it counts
    first()
    assert advanced == [("a", (20, 2))]
    first()  # settling twice changes nothing
    other()
    assert advanced == [("a", (20, 2)), ("b", (5, 1))]
    assert ledger.pending("a") == ledger.pending("b") == 0


def test_a_mark_with_nothing_to_deliver_passes_once_everything_before_it_is_settled() -> None:
    advanced: list[tuple[int, int]] = []
    ledger = delivery.MarkLedger(lambda sid, mark: advanced.append(mark))
    settle = ledger.expect("a", (10, 1))
    ledger.passed("a", (30, 1))  # throttled lines after it
    assert advanced == []
    settle()
    assert advanced == [(30, 1)]
    ledger.passed("a", (40, 1))  # nothing waits: passes at once
    assert advanced == [(30, 1), (40, 1)]
    gone = ledger.expect("a", (50, 1))
    ledger.forget("a")
    gone()
    assert advanced == [(30, 1), (40, 1)]


# -- the manager with an acknowledging consumer ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_line_is_marked_delivered_when_settled_never_when_handed_on(unit: Unit) -> None:
    received: list[str] = []
    link = HoldingLink(received)
    m, cid = await running_with(unit, link)
    link.drain()
    base = m.delivered_marks.get("s1", (0, 0))
    unit.engine.stdin(cid, "say one")
    unit.engine.stdin(cid, "say two")
    await until(lambda: link.lines_held() >= 4, 2, "lines handed on")
    # handed to the link: not delivered, nothing recorded anywhere
    assert m.delivered_marks.get("s1", (0, 0)) == base
    assert journal(unit).get("s1", (0, 0)) == base
    link.drain(1)
    (ns, _), = [e for e in engine_texts(unit, cid) if e[1] == "> say one"]
    # settled: recorded in the journal in the same call, the store comes later
    assert m.delivered_marks["s1"] == (ns, 1) == journal(unit)["s1"]
    assert stored_mark(unit, "s1") < ns
    link.drain()
    last_ns = engine_texts(unit, cid)[-1][0]
    assert journal(unit)["s1"] == (last_ns, 1)
    unit.clock.advance(unit.config.servers.console_mark_interval)
    await until(lambda: stored_mark(unit, "s1") == last_ns, 2, "the store's copy")


@pytest_twisted.ensureDeferred
async def test_a_sigkill_at_any_step_neither_loses_nor_repeats_a_line(unit: Unit) -> None:
    seed = int(os.environ.get("CTRLAGENT_MARK_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    note = "seed {} (CTRLAGENT_MARK_SEED replays it)".format(seed)
    received: list[str] = []  # at the Panel, across every agent process
    link = HoldingLink(received)
    m, cid = await running_with(unit, link)
    printed = 0
    crashes = 0
    for _ in range(60):
        step = rng.choice(["print", "print", "burst", "drain", "drain", "crash"])
        if step == "print":
            printed += 1
            unit.engine.print(cid, "line {}".format(printed), rng.choice(["stdout", "stderr"]))
        elif step == "burst":
            lines = []
            for _ in range(rng.randint(2, 6)):
                printed += 1
                lines.append((rng.choice(["stdout", "stderr"]), "line {}".format(printed)))
            burst(unit, cid, lines)
        elif step == "drain":
            link.drain(rng.randint(0, len(link.held)))
        else:
            crashes += 1
            await crash(m)
            link.die()
            if rng.random() < 0.5:
                printed += 1
                unit.engine.print(cid, "line {}".format(printed))  # while no agent runs
            link = HoldingLink(received)
            m = start_manager(unit, link)
            await until(lambda m=m: m.get("s1").output_attached, 2, "re-attached")
        await sleep(0)
    link.drain()
    want = [text for _, text in engine_texts(unit, cid)]
    await until(lambda: len(received) >= len(want), 2, "every line at the Panel " + note)
    assert received == want, note
    assert crashes > 0, note


@pytest_twisted.ensureDeferred
async def test_each_event_of_one_read_has_its_own_mark(unit: Unit) -> None:
    received: list[str] = []
    link = HoldingLink(received)
    m, cid = await running_with(unit, link)
    link.drain()
    server = m.get("s1")
    ns = 1_893_456_000_000_000_000  # 2030-01-01T00:00:00Z
    # one read: stdout, stderr, stdout; three lines share a nanosecond
    server.console.take(
        [LogLine(ns + 100, "stdout", "a"), LogLine(ns + 100, "stdout", "b"),
         LogLine(ns + 100, "stderr", "c"), LogLine(ns + 200, "stdout", "d")],
        None,
    )
    assert [e.lines for e in link.held] == [["a", "b"], ["c"], ["d"]]
    link.drain(1)
    assert m.delivered_marks["s1"] == (ns + 100, 2)
    link.drain(1)
    assert m.delivered_marks["s1"] == (ns + 100, 3) == journal(unit)["s1"]
    await crash(m)
    link.die()  # "d" was handed on, never taken
    second = HoldingLink(received)
    m = start_manager(unit, second)
    assert (m.get("s1").console.mark, m.get("s1").console.mark_count) == (ns + 100, 3)


@pytest_twisted.ensureDeferred
async def test_throttled_lines_are_passed_once_the_lines_before_them_are_delivered(
    unit: Unit,
) -> None:
    link = HoldingLink([])
    m, cid = await running_with(unit, link)
    link.drain()
    server = m.get("s1")
    server.console.throttle.limit = 2
    server.console.throttle._window_start = unit.clock.seconds()
    server.console.throttle._admitted = 0
    burst(unit, cid, [("stdout", "line {}".format(i)) for i in range(5)])
    assert [e.lines for e in link.held] == [["line 0", "line 1"]]
    last_ns = engine_texts(unit, cid)[-1][0]
    assert m.delivered_marks["s1"][0] < last_ns
    link.drain()
    # the three throttled lines never go out; the mark passes them
    assert m.delivered_marks["s1"] == (last_ns, 1) == journal(unit)["s1"]
    server.console.throttle.cancel()


@pytest_twisted.ensureDeferred
async def test_after_the_consumer_leaves_nothing_more_counts_as_delivered(unit: Unit) -> None:
    link = HoldingLink([])
    m, cid = await running_with(unit, link)
    link.drain()
    before = m.delivered_marks["s1"]
    m.remove_listener(link)  # the Panel link stops first at shutdown
    unit.engine.stdin(cid, "say late")
    await sleep(0.01)
    assert m.delivered_marks["s1"] == before == journal(unit)["s1"]


# -- without a consumer (no Panel link) ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_a_panel_link_handing_lines_on_delivers_them(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    cid = m.get("s1").container_id or ""
    unit.engine.stdin(cid, "say hello")
    last_ns = engine_texts(unit, cid)[-1][0]
    assert "[Server] hello" in unit.lines("s1")
    assert m.delivered_marks["s1"] == (last_ns, 1) == journal(unit)["s1"]
    await crash(m)
    unit.engine.stdin(cid, "say while-down")
    second = unit.manager()
    await until(lambda: "[Server] while-down" in unit.lines("s1"), 2, "recovered")
    await sleep(0.05)
    assert unit.lines("s1") == [text for _, text in engine_texts(unit, cid)]
    assert second.console_history("s1", 10) == unit.lines("s1")


# -- the journal and the store ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_its_journal_a_restart_repeats_from_the_store_mark_and_loses_nothing(
    unit: Unit,
) -> None:
    received: list[str] = []
    link = HoldingLink(received)
    m, cid = await running_with(unit, link)
    unit.engine.stdin(cid, "say stored")
    link.drain()
    unit.clock.advance(unit.config.servers.console_mark_interval)
    stored = engine_texts(unit, cid)[-1][0]
    await until(lambda: stored_mark(unit, "s1") == stored, 2, "the store's copy")
    unit.engine.stdin(cid, "say journalled")
    link.drain()
    await crash(m)
    os.unlink(journal_path(unit))  # a power cut took the page cache with it
    second = HoldingLink(received)
    m = start_manager(unit, second)
    await until(lambda: second.lines_held() >= 2, 2, "the replay")
    second.drain()
    after = [text for ns, text in engine_texts(unit, cid) if ns > stored]
    assert after == ["> say journalled", "[Server] journalled"]
    assert received[-4:] == after + after  # repeated, not lost


@pytest_twisted.ensureDeferred
async def test_the_newer_of_the_store_and_the_journal_wins_and_the_store_catches_up(
    unit: Unit,
) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.stopService()
    store = open_store(reactor, unit.config.state_dir)
    await store.update("s1", console_mark=500, extra={"markCount": 1})
    await store.close()
    with open(journal_path(unit), "wb") as f:
        f.write(encode_record("s1", (400, 1)))  # older: a journal from before a power cut
    m = unit.manager()
    assert (m.get("s1").console.mark, m.get("s1").console.mark_count) == (500, 1)
    await m.stopService()
    with open(journal_path(unit), "ab") as f:
        f.write(encode_record("s1", (700, 2)))  # newer: a SIGKILL before the store's copy
    m = unit.manager()
    assert (m.get("s1").console.mark, m.get("s1").console.mark_count) == (700, 2)
    await until(lambda: stored_mark(unit, "s1") == 700, 2, "the store catching up")
    # the journal was rewritten: one record per server
    with open(journal_path(unit), "rb") as f:
        assert f.read().count(b"\n") == 2


@pytest_twisted.ensureDeferred
async def test_a_torn_or_damaged_journal_is_skipped_with_one_warning_never_fatal(
    unit: Unit, warnings: list[str]
) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.create_server("s2", PARAMS)
    await m.stopService()
    good = encode_record("s1", (900, 1))
    torn = encode_record("s2", (950, 1))[:-7]
    flipped = encode_record("s2", (990, 1)).replace(b"990", b"999")
    with open(journal_path(unit), "wb") as f:
        f.write(b"ctrlagent console marks 1\n" + good + flipped + b"\xff\xfe\n" + torn)
    m = unit.manager()
    assert m.get("s1").console.mark == 900
    assert m.get("s2").console.mark == 0  # neither the damaged nor the torn record counts
    about = [w for w in warnings if "journal" in w]
    assert len(about) == 1 and "3 damaged or torn" in about[0]
    await m.stopService()

    warnings.clear()
    with open(journal_path(unit), "wb") as f:
        f.write(os.urandom(4096).replace(b"\n", b"x"))
    m = unit.manager()
    assert m.get("s1").console.mark == 900  # from the store, written at the last stop
    assert any("is not a journal" in w for w in warnings)
    await m.stopService()

    warnings.clear()
    os.unlink(journal_path(unit))
    os.mkdir(journal_path(unit))
    m = unit.manager()  # starts all the same, marks from the store
    assert m.get("s1").console.mark == 900
    assert not m.journal.usable and warnings
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running without a journal")


def test_the_journal_is_compacted_to_one_record_per_server(tmp_path: Any) -> None:
    path = str(tmp_path / JOURNAL_NAME)
    j = MarkJournal(path)
    j.open({})
    marks = {}
    for i in range(1, 20_000):
        sid = "s{}".format(i % 3)
        marks[sid] = (i, 1)
        j.record(sid, (i, 1))
        if j.due():
            j.compact(marks)
    assert os.path.getsize(path) < delivery.COMPACT_AFTER + 100
    j.compact(marks)
    assert os.path.getsize(path) < 200
    j.record("s1", (30_000, 2))
    j.close()
    assert MarkJournal(path).load() == {**marks, "s1": (30_000, 2)}
    assert not os.path.exists(path + ".tmp")


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c.d-1"]), st.integers(0, 2**63 - 1),
                  st.integers(0, 9)),
        max_size=12,
    ),
    cut=st.integers(0, 2000),
    garbage=st.binary(max_size=80),
)
def test_a_journal_cut_anywhere_yields_each_servers_last_whole_record(
    records: list[tuple[str, int, int]], cut: int, garbage: bytes
) -> None:
    header = b"ctrlagent console marks 1\n"
    lines = [encode_record(sid, (ns, n)) for sid, ns, n in records]
    data = header + b"".join(lines)
    cut = min(cut, len(data))
    expected: dict[str, tuple[int, int]] = {}
    end = len(header)
    for (sid, ns, n), line in zip(records, lines, strict=True):
        end += len(line)
        if end - 1 <= cut:  # whole but for its newline at most
            expected[sid] = (ns, n)
    marks, _, _ = parse_journal(data[:cut])
    assert marks == expected
    # damage anywhere never raises, and never invents a mark
    damaged, _, _ = parse_journal(garbage + data[:cut] + garbage)
    assert set(damaged.items()) <= {(sid, (ns, n)) for sid, ns, n in records}


@pytest_twisted.ensureDeferred
async def test_deleting_a_server_resets_its_mark_so_its_id_can_come_back(unit: Unit) -> None:
    link = HoldingLink([])
    m, cid = await running_with(unit, link)
    link.drain()
    assert journal(unit)["s1"][0] > 0
    await m.delete("s1")
    assert journal(unit)["s1"] == (0, 0)
    await m.create_server("s1", PARAMS)
    await m.stopService()
    m = start_manager(unit, HoldingLink([]))
    assert m.get("s1").console.mark == 0


@pytest.mark.parametrize("value", [-1.0, 3601.0, float("nan"), float("inf")])
def test_the_mark_interval_must_be_between_zero_and_an_hour(value: float) -> None:
    config = AgentConfig(secret="x", servers=ServersConfig(console_mark_interval=value))
    with pytest.raises(ConfigInvalid, match="servers.console_mark_interval"):
        validate(config)
    validate(replace(config, servers=ServersConfig(console_mark_interval=0.0)))


# -- re-attaching ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_attach_while_the_history_is_read_back_delivers_each_line_once(
    unit: Unit,
) -> None:
    first = unit.manager()
    await first.create_server("s1", PARAMS)
    await first.start("s1")
    await until(lambda: first.get("s1").state is S.RUNNING, 2, "running")
    cid = first.get("s1").container_id or ""
    unit.engine.stdin(cid, "say before")
    await until(lambda: "[Server] before" in said(unit), 2, "before")
    await sleep(0.05)
    await crash(first)

    unit.engine.history_gate = gate = Deferred()
    second = unit.manager()
    server = second.get("s1")
    await until(lambda: server.container_id == cid and server.output_attached, 2,
                "re-attached, reading the history")
    await sleep(0.05)
    # The console is followed first; its history is read back behind it.
    assert server.output_attached
    assert "[Server] before" not in server.console_history(100)
    unit.engine.stdin(cid, "say during")
    await until(lambda: "[Server] during" in said(unit), 2, "during")
    # a re-attach meanwhile (as after an engine's restart): a second follow,
    # and a second wish to read the history, which the first read answers
    history_reads: list[str] = []
    output = unit.engine.output

    def counted(cid: str, **kwargs: Any) -> Any:
        if not kwargs.get("follow") and kwargs.get("tail"):
            history_reads.append(cid)
        return output(cid, **kwargs)

    unit.engine.output = counted  # type: ignore[method-assign]
    await server.attach(recover=True)
    assert server.output_attached
    gate.callback(None)  # the history lands in front of what was followed
    await until(lambda: second.reconciled > 0, 2, "reconciled")
    unit.engine.stdin(cid, "say after")
    await until(lambda: "[Server] after" in said(unit), 2, "after")
    await sleep(0.05)
    assert said(unit) == ["[Server] before", "[Server] during", "[Server] after"]
    history = [line for line in server.console_history(100) if line.startswith("[Server]")]
    assert history == ["[Server] before", "[Server] during", "[Server] after"]
    assert history_reads == []  # the first read served both attaches
    followers = [c for c in unit.engine.containers.values() if c.cid == cid][0].followers
    assert len([f for f in followers if not f.ended]) == 1


async def running_then_agent_killed(unit: Unit, count: int) -> None:
    """Servers s0..s{count-1} running, their lines delivered, and the agent killed."""
    first = unit.manager()
    for n in range(count):
        await first.create_server("s{}".format(n), PARAMS)
        await first.start("s{}".format(n))
    await until(lambda: all(first.get("s{}".format(n)).state is S.RUNNING for n in range(count)),
                5, "all running")
    await sleep(0.05)  # the marks' commit
    await crash(first)


@pytest_twisted.ensureDeferred
async def test_a_restarted_agent_follows_every_console_before_reading_the_histories_back(
    unit: Unit,
) -> None:
    """The histories are read behind the followed consoles, HISTORY_READS at a time."""
    count = HISTORY_READS * 3
    await running_then_agent_killed(unit, count)

    reads: list[str] = []  # the containers whose kept output was read, not followed
    output = unit.engine.output

    def counted(cid: str, **kwargs: Any) -> Any:
        if not kwargs.get("follow"):
            reads.append(cid)
        return output(cid, **kwargs)

    unit.engine.output = counted  # type: ignore[method-assign]
    unit.engine.history_gate = gate = Deferred()
    second = unit.manager()
    servers = [second.get("s{}".format(n)) for n in range(count)]
    await until(lambda: all(s.output_attached for s in servers), 5, "every console followed")
    await sleep(0.05)
    assert len(reads) == HISTORY_READS  # the others wait for a slot
    assert all(not any(line.endswith("For help, type help") for line in s.console_history(50))
               for s in servers)
    unit.engine.history_gate = None
    gate.callback(None)
    await until(lambda: all(any(line.endswith("For help, type help")
                                for line in s.console_history(50)) for s in servers),
                5, "every history read back")
    assert sorted(reads) == sorted(s.container_id for s in servers)  # each read once


async def _restarted_with_history_reads_stuck(unit: Unit) -> tuple[ServerManager, Any]:
    """
    HISTORY_READS + 1 running servers and a restarted agent whose first
    HISTORY_READS history reads never end (the engine never answers them):
    the returned server's read waits for a slot.
    """
    count = HISTORY_READS + 1
    await running_then_agent_killed(unit, count)
    stuck: list[str] = []
    output = unit.engine.output

    def stalling(cid: str, **kwargs: Any) -> Any:
        if not kwargs.get("follow") and kwargs.get("tail") and len(stuck) < HISTORY_READS:
            stuck.append(cid)
            return FakeStream([], follow=True)  # ends only when closed
        return output(cid, **kwargs)

    unit.engine.output = stalling  # type: ignore[method-assign]
    second = unit.manager()
    servers = [second.get("s{}".format(n)) for n in range(count)]
    await until(lambda: all(s.output_attached for s in servers) and len(stuck) == HISTORY_READS,
                5, "every console followed, the reads stuck")
    (waiting,) = [s for s in servers if s.container_id not in stuck]
    return second, waiting


def _history_back(server: Any) -> bool:
    return any(line.endswith("For help, type help") for line in server.console_history(50))


@pytest_twisted.ensureDeferred
async def test_a_death_is_reported_while_other_servers_hold_every_history_read(
    unit: Unit,
) -> None:
    """The death's wait for its history is bounded; the stuck reads give up in time."""
    second, server = await _restarted_with_history_reads_stuck(unit)
    cid = server.container_id or ""
    unit.engine.print(cid, "last words")
    await until(lambda: "last words" in unit.lines(server.server_id), 2, "last words")
    unit.engine.die(cid, 137, external_kill=True)
    drain = unit.config.timeouts.exit_drain
    for _ in range(40):  # bounded: about two exit_drain periods are needed
        if server.state is S.OFFLINE:
            break
        unit.clock.advance(drain / 4)
        await sleep(0.01)
    assert server.state is S.OFFLINE
    assert unit.lines(server.server_id).count("last words") == 1
    assert not _history_back(server)  # its read still waits for a slot
    unit.clock.advance(HISTORY_READ_SECONDS)  # the stuck reads expire, slots free up
    await until(lambda: _history_back(server), 2, "its history read back after all")


@pytest_twisted.ensureDeferred
async def test_a_console_cleared_while_its_history_waits_for_a_slot_stays_cleared(
    unit: Unit,
) -> None:
    second, server = await _restarted_with_history_reads_stuck(unit)
    second.console_clear(server.server_id)
    unit.clock.advance(HISTORY_READ_SECONDS)  # the stuck reads expire, slots free up
    await sleep(0.1)
    assert server.console_history(50) == []


def said(unit: Unit) -> list[str]:
    return [line for line in unit.lines("s1") if line.startswith("[Server]")]


@pytest_twisted.ensureDeferred
async def test_history_holds_exactly_the_lines_the_mark_covers(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    server = m.get("s1")
    base = 1_795_000_000_000_000_000  # 2026-11-18T11:06:40Z
    server.console.take_history(
        [LogLine(base + 100, "stdout", "a"), LogLine(base + 100, "stdout", "b"),
         LogLine(base + 99, "stdout", "old"), LogLine(base + 101, "stdout", "new")],
        MarkFilter(base + 100, 1),
    )
    # "b" shares the mark's nanosecond beyond its count: it comes again, live
    assert m.console_history("s1", 10) == ["a", "old"]


@settings(max_examples=200, deadline=None)
@given(server_id=st.text(max_size=40), ns=st.integers(0, 2**63 - 1), count=st.integers(0, 2**32))
def test_a_record_is_the_json_of_id_and_mark_with_its_crc(server_id: str, ns: int,
                                                         count: int) -> None:
    # The record's head is encoded once per server id: any id (quotes,
    # backslashes, non-ASCII, surrogates) must still give exactly the JSON
    # a reader parses back.
    record = encode_record(server_id, (ns, count))
    payload = json.dumps([server_id, ns, count], separators=(",", ":")).encode("ascii")
    assert record == payload + b" %08x\n" % binascii.crc32(payload)
    assert parse_journal(record)[0] == {server_id: (ns, count)}
