"""Unit tests of the console buffer/throttle, the states and the store."""

from __future__ import annotations

import calendar
import gc
import random
import sqlite3
from collections import deque
from typing import Any

import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock

from ctrlagent.engine.docker.timefmt import split_timestamp
from ctrlagent.engine.interface import LogLine
from ctrlagent.servers.console import (
    ConsoleBuffer,
    ConsoleLine,
    ConsoleThrottle,
    MarkFilter,
    stamp,
)
from ctrlagent.servers.lifecycle import ServerState, panel_status
from ctrlagent.servers.store import open_store

S = ServerState


def test_panel_mapping_covers_every_state() -> None:
    assert panel_status(S.INSTALL_FAILED) == "INSTALL_FAILED"
    assert panel_status(S.RUNNING) == "RUNNING"
    assert panel_status(S.SUSPENDED) == "SUSPENDED"
    for state in S:
        if state is not S.UNKNOWN:
            assert panel_status(state) == state.value.upper()
    # unknown keeps the last known status for the Panel's enum
    assert panel_status(S.UNKNOWN, S.RUNNING) == "RUNNING"
    assert panel_status(S.UNKNOWN) == "OFFLINE"
    assert str(S.RUNNING) == "running"


@given(
    seconds=st.integers(min_value=0, max_value=4_000_000_000),
    nanos=st.integers(min_value=0, max_value=999_999_999),
    text=st.text(max_size=30),
)
def test_docker_timestamps_are_exact_nanoseconds(seconds: int, nanos: int, text: str) -> None:
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = "{:09d}".format(nanos).rstrip("0")
    line = "{}{}Z {}".format(stamp, "." + digits if digits else "", text)
    assert split_timestamp(line) == (seconds * 1_000_000_000 + nanos, text)


def test_timestamp_with_offset_and_without_prefix() -> None:
    base = calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0))
    assert split_timestamp("2026-01-02T04:04:05.5+01:00 x")[0] == base * 10**9 + 500_000_000
    assert split_timestamp("plain line") == (0, "plain line")


def test_ring_buffer_keeps_the_latest() -> None:
    buf = ConsoleBuffer(3)
    for i in range(5):
        buf.append(ConsoleLine(float(i), "stdout", str(i)))
    assert [line.text for line in buf] == ["2", "3", "4"]
    assert [line.text for line in buf.tail(2)] == ["3", "4"]
    assert buf.tail(0) == [] and len(buf.tail(10)) == 3
    assert buf.last_activity == 4.0
    buf.clear()
    assert len(buf) == 0


def test_the_ring_buffer_gives_back_exactly_what_a_plain_deque_of_lines_keeps() -> None:
    """Random appends, batches larger than the ring, resizes and clears against a model."""
    rng = random.Random(1616)
    buf = ConsoleBuffer(7)
    model: deque[Any] = deque(maxlen=7)
    ns = 1_700_000_000_000_000_000
    for step in range(3000):
        action = rng.random()
        if action < 0.6:
            batch: list[Any] = []
            for _ in range(rng.choice([0, 1, 2, 3, 6, 7, 8, 15, 40])):
                ns += rng.choice([0, 1, 1000, 10**9])
                kind = rng.random()
                if kind < 0.7:
                    batch.append(LogLine(ns, rng.choice(["stdout", "stderr"]), "l{}".format(step)))
                elif kind < 0.8:
                    batch.append(LogLine(0, "stdout", "no time {}".format(step)))
                else:
                    at = rng.uniform(0, 2e9)  # any float comes back bit for bit
                    stream = rng.choice(["agent", "install"])
                    batch.append(ConsoleLine(at, stream, "é {}".format(step)))
            buf.extend(batch)
            model.extend(batch)
        elif action < 0.7:
            older = [LogLine(rng.randint(1, 10**18), "stdout", "old {} {}".format(step, k))
                     for k in range(rng.choice([0, 1, 3, 7, 20]))]
            buf.prepend(older)  # a history read back behind the followed lines
            model = deque(older + list(model), maxlen=model.maxlen)
        elif action < 0.8:
            line = ConsoleLine(rng.uniform(0, 2e9), "agent", "notice {}".format(step))
            buf.append(line)
            model.append(line)
        elif action < 0.9:
            size = rng.choice([1, 2, 5, 7, 12, 30])
            buf.resize(size)
            model = deque(model, maxlen=size)
        elif action < 0.92:
            buf.clear()
            model.clear()
        expected = [_same_kind(line) for line in model]
        assert len(buf) == len(model) and buf.capacity == model.maxlen
        assert list(buf) == expected
        count = rng.randint(0, 35)
        assert buf.tail(count) == (expected[-count:] if count else [])
        assert buf.texts(count) == [line.text for line in (expected[-count:] if count else [])]
    assert buf.texts(3, stamped=True) == [stamp(line.at) + line.text for line in list(buf)[-3:]]


def _same_kind(line: Any) -> Any:
    # A line without the engine's time comes back as the agent's own kind, same fields.
    if isinstance(line, LogLine) and not line.ns:
        return ConsoleLine(0.0, line.stream, line.text, 0)
    return line


def test_the_ring_buffer_holds_no_line_objects_for_the_collector() -> None:
    buf = ConsoleBuffer(1000)
    buf.extend([LogLine(10**18 + i, "stdout", "line {}".format(i)) for i in range(2500)])
    buf.append(ConsoleLine(5.0, "agent", "notice"))
    held = [obj for obj in gc.get_referents(buf) if not isinstance(obj, type)]
    # Texts, stamps and codes: what the collector walks is strings, no line objects.
    assert not [obj for obj in gc.get_referents(*held) if not isinstance(obj, (str, int, type))]
    # Two containers the collector looks at (the texts, the stamps), however many lines.
    assert sum(1 for obj in held if gc.is_tracked(obj)) == 2
    assert buf.tail(2)[-1] == ConsoleLine(5.0, "agent", "notice")


def test_throttle_reports_drops_once_per_interval() -> None:
    clock = Clock()
    reports: list[tuple[int, float]] = []
    throttle = ConsoleThrottle(clock, 3, 1.0, lambda n, i: reports.append((n, i)))
    admitted = [throttle.admit() for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert reports == []
    clock.advance(0.5)
    assert not throttle.admit()
    clock.advance(0.5)
    assert reports == [(8, 1.0)]  # one notice for the whole interval
    assert [throttle.admit() for _ in range(4)] == [True, True, True, False]
    clock.advance(1.0)
    assert reports == [(8, 1.0), (1, 1.0)]
    assert throttle.total_dropped == 9
    clock.advance(5.0)
    assert len(reports) == 2  # no drops, no notice


def test_throttle_admits_the_head_of_a_batch_and_counts_the_rest() -> None:
    clock = Clock()
    reports: list[int] = []
    throttle = ConsoleThrottle(clock, 5, 1.0, lambda n, i: reports.append(n))
    assert throttle.admit_many(3) == 3
    assert throttle.admit_many(4) == 2
    assert throttle.admit_many(10) == 0
    assert throttle.admit_many(0) == 0
    clock.advance(1.0)
    assert reports == [12] and throttle.total_dropped == 12
    assert throttle.admit_many(7) == 5
    unlimited = ConsoleThrottle(clock, 0, 1.0, lambda n, i: reports.append(n))
    assert unlimited.admit_many(10_000) == 10_000


def test_throttle_flush_reports_at_once() -> None:
    clock = Clock()
    reports: list[int] = []
    throttle = ConsoleThrottle(clock, 1, 1.0, lambda n, i: reports.append(n))
    throttle.admit()
    throttle.admit()
    throttle.flush()
    assert reports == [1]
    assert clock.getDelayedCalls() == []


def test_mark_filter_drops_delivered_lines_including_same_nanosecond() -> None:
    filt = MarkFilter(100, 2)
    assert [filt.seen(ns) for ns in (50, 100, 100, 100, 101, 0)] == [
        True, True, True, False, False, False]


@pytest_twisted.ensureDeferred
async def test_store_is_durable_and_ordered(tmp_path: Any) -> None:
    store = open_store(reactor, str(tmp_path))
    await store.insert("a", "{}", state="installing")
    await store.update("a", desired="running", console_mark=123, extra={"markCount": 2})
    await store.update_many([("a", {"state": "running"}), ("a", {"state": "crashed"})])
    await store.insert("b", "{}")
    await store.delete("b")
    await store.close()
    db = sqlite3.connect(str(tmp_path / "servers.sqlite3"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = open_store(reactor, str(tmp_path))
    records = again.load()
    await again.close()
    assert [(r.server_id, r.desired, r.state, r.console_mark, r.extra) for r in records] == [
        ("a", "running", "crashed", 123, {"markCount": 2})]


@pytest_twisted.ensureDeferred
async def test_marks_are_stored_as_update_many_stores_them(tmp_path: Any) -> None:
    # update_marks (the marks of every server at once, rows made in the
    # store's thread) leaves the very columns update_many leaves.
    for name in ("one", "many"):
        store = open_store(reactor, str(tmp_path / name))
        for sid in ("a", "b", "c"):
            await store.insert(sid, "{}", state="running")
        marks = {"a": (10**18 + 7, 3), "b": (5, 0)}
        if name == "one":
            await store.update_many([(sid, {"console_mark": ns, "extra": {"markCount": n}})
                                     for sid, (ns, n) in marks.items()])
        else:
            await store.update_marks(marks)
        await store.close()
    rows = []
    for name in ("one", "many"):
        db = sqlite3.connect(str(tmp_path / name / "servers.sqlite3"))
        rows.append(db.execute(
            "SELECT server_id, console_mark, extra FROM servers ORDER BY server_id").fetchall())
        db.close()
    assert rows[0] == rows[1]
    again = open_store(reactor, str(tmp_path / "many"))
    records = {r.server_id: (r.console_mark, r.extra) for r in again.load()}
    await again.close()
    assert records == {"a": (10**18 + 7, {"markCount": 3}), "b": (5, {"markCount": 0}),
                       "c": (0, {})}


@pytest_twisted.ensureDeferred
async def test_marks_that_cannot_be_stored_change_nothing(tmp_path: Any) -> None:
    store = open_store(reactor, str(tmp_path))
    await store.insert("a", "{}")
    await store.update_marks({"a": (100, 1)})
    # A mark past SQLite's integer range fails the whole transaction: the
    # first server's new mark does not stay either.
    try:
        await store.update_marks({"a": (200, 2), "b": (2**64, 1)})
    except Exception as e:  # noqa: BLE001
        failed: Exception | None = e
    else:
        failed = None
    assert failed is not None
    await store.close()
    again = open_store(reactor, str(tmp_path))
    assert [(r.console_mark, r.extra) for r in again.load()] == [(100, {"markCount": 1})]
    await again.close()
