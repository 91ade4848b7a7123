"""
Unit tests of the servers' stats sampling from the kernel: one ``StatsHub``
timer for every server, each read once per ``stats_interval``, on the
in-memory engine and a ``Clock``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from ctrlagent.config import ServersConfig
from ctrlagent.engine.interface import ContainerSpec
from ctrlagent.errors import NotFound
from ctrlagent.servers.stats import StatsHub, StatsSampler
from ctrlagent.testing.engine import FakeEngine
from ctrlagent.work import Tracker

INTERVAL = 2.0
SLICES = 8  # ticks of 0.25 s: exact in binary, so a Clock advanced tick by tick meets each


def run_for(clock: Clock, seconds: float) -> None:
    """Advance tick by tick (a timer set during ``advance`` counts from its end)."""
    for _ in range(round(seconds / (INTERVAL / SLICES))):
        clock.advance(INTERVAL / SLICES)


class Reader:
    """Counts its reads; raises ``NotFound`` once ``gone``."""

    def __init__(self, engine: FakeEngine, cid: str) -> None:
        self._engine = engine
        self._cid = cid
        self.reads = 0
        self.gone = False
        self.closed = False

    def read(self) -> Any:
        if self.gone:
            raise NotFound("gone")
        self.reads += 1
        return self._engine._sample(self._engine.get(self._cid))

    def close(self) -> None:
        self.closed = True


async def _running(engine: FakeEngine, n: int) -> list[str]:
    cids = []
    for i in range(n):
        cid = await engine.create(ContainerSpec(name="c{}".format(i), image="img", labels={},
                                                env={}, interactive=True))
        await engine.start(cid)
        cids.append(cid)
    return cids


def _sampler(engine: Any, clock: Clock, hub: StatsHub | None, cid: str, published: list[str],
             **config: Any) -> StatsSampler:
    return StatsSampler(
        cid, engine=engine, clock=clock, tracker=Tracker("test"),
        config=ServersConfig(stats_interval=INTERVAL, **config),
        container_id=lambda: cid, active=lambda: True,
        on_sample=lambda: published.append(cid), hub=hub,
    )


class CountingEngine:
    """The fake engine, counting what the samplers ask of it."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self.streams = 0
        self.polls = 0

    def stats_stream(self, cid: str) -> Any:
        self.streams += 1
        return self._engine.stats_stream(cid)

    def stats(self, cid: str) -> Any:
        self.polls += 1
        return self._engine.stats(cid)

    def stats_reader(self, cid: str) -> Any:
        return self._engine.stats_reader(cid)


@pytest_twisted.ensureDeferred
async def test_one_timer_reads_every_server_once_per_interval_and_no_engine_stream() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    counting = CountingEngine(engine)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    published: list[str] = []
    cids = await _running(engine, 50)
    samplers = [_sampler(counting, clock, hub, cid, published) for cid in cids]
    for sampler in samplers:
        sampler.start()
    assert len(hub) == 50
    # Every container's figures from its reader: no stream, no poll.
    assert counting.streams == counting.polls == 0
    assert len(engine.stats_readers) == 50
    # One timer for all 50 servers (the fake's own game timers aside).
    hub_calls = [c for c in clock.getDelayedCalls() if c.func == hub._tick]
    assert len(hub_calls) == 1
    assert all(r.reads == 1 for r in engine.stats_readers)  # the first read, at once
    per_tick = []
    for _ in range(SLICES):
        before = sum(r.reads for r in engine.stats_readers)
        clock.advance(INTERVAL / SLICES)
        per_tick.append(sum(r.reads for r in engine.stats_readers) - before)
    # One interval: each server read once more, an eighth of them per tick.
    assert all(r.reads == 2 for r in engine.stats_readers)
    assert sorted(per_tick) == [6] * 6 + [7] * 2
    run_for(clock, INTERVAL * 3)
    assert all(r.reads == 5 for r in engine.stats_readers)
    # Every read is published (nothing read to be dropped), in the sample's shape.
    assert len(published) == 50 * 5
    assert samplers[0].latest["cpu"] == 12.5 and samplers[0].latest["memory"] == 50.0
    assert set(samplers[0].latest) == {"at", "cpu", "memory", "memoryLimit", "rx", "tx",
                                       "blkRead", "blkWrite", "pids"}


@pytest_twisted.ensureDeferred
async def test_stopped_samplers_leave_the_hub_and_its_timer_stops_with_the_last() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    cids = await _running(engine, 3)
    samplers = [_sampler(engine, clock, hub, cid, []) for cid in cids]
    for sampler in samplers:
        sampler.start()
    samplers[0].stop()
    assert len(hub) == 2 and engine.stats_readers[0].closed
    run_for(clock, INTERVAL)
    assert engine.stats_readers[0].reads == 1 and engine.stats_readers[1].reads == 2
    for sampler in samplers[1:]:
        sampler.stop()
    assert len(hub) == 0
    assert not [c for c in clock.getDelayedCalls() if c.func == hub._tick]


@pytest_twisted.ensureDeferred
async def test_a_reader_whose_container_is_gone_is_dropped_and_closed() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    (cid,) = await _running(engine, 1)
    sampler = _sampler(engine, clock, hub, cid, [])
    sampler.start()
    await engine.kill(cid, "SIGKILL")
    run_for(clock, INTERVAL)
    assert len(hub) == 0 and engine.stats_readers[0].closed
    assert not [c for c in clock.getDelayedCalls() if c.func == hub._tick]


@pytest_twisted.ensureDeferred
async def test_an_engine_without_kernel_figures_falls_back_to_its_stats_stream() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    engine.local_stats = False  # an engine on another host
    counting = CountingEngine(engine)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    (cid,) = await _running(engine, 1)
    published: list[str] = []
    sampler = _sampler(counting, clock, hub, cid, published)
    sampler.start()
    assert len(hub) == 0 and counting.streams == 1
    sampler.stop()
    # And with the kernel turned off by config, the engine's API is used as before.
    engine.local_stats = True
    sampler = _sampler(counting, clock, hub, cid, published, stats_from_kernel=False)
    sampler.start()
    assert len(hub) == 0 and counting.streams == 2 and engine.stats_readers == []
    sampler.stop()


@pytest_twisted.ensureDeferred
async def test_a_reader_that_comes_after_the_sampler_stopped_is_closed_unused() -> None:
    from twisted.internet.defer import Deferred

    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    (cid,) = await _running(engine, 1)
    pending: Deferred[Any] = Deferred()

    class SlowEngine:
        def stats_reader(self, cid: str) -> Any:
            return pending

    sampler = _sampler(SlowEngine(), clock, hub, cid, [])
    sampler.start()
    sampler.start()  # asked once, not twice
    sampler.stop()
    reader = Reader(engine, cid)
    pending.callback(reader)
    assert reader.closed and reader.reads == 0 and len(hub) == 0


class Member:
    """A hub member that notes its number in ``reads`` when read."""

    def __init__(self, n: int, reads: list[int]) -> None:
        self.n = n
        self.reads = reads

    def read_kernel(self) -> None:
        self.reads.append(self.n)


def reads_per_tick(clock: Clock, reads: list[int], ticks: int, period: float) -> list[int]:
    """How many members each of ``ticks`` ticks ``period`` apart read."""
    counts = []
    for _ in range(ticks):
        before = len(reads)
        clock.advance(period)
        counts.append(len(reads) - before)
    return counts


def test_the_hub_spreads_servers_evenly_over_its_slices() -> None:
    clock = Clock()
    hub = StatsHub(clock, INTERVAL, slices=4)
    reads: list[int] = []

    members = [Member(n, reads) for n in range(10)]
    for m in members:
        hub.add(m)  # type: ignore[arg-type]
    hub.add(members[0])  # type: ignore[arg-type]  # twice: still once
    sizes = reads_per_tick(clock, reads, 4, INTERVAL / 4)
    assert sorted(sizes) == [2, 2, 3, 3] and sorted(reads) == list(range(10))


def test_more_servers_than_the_slices_hold_add_slices_not_reads_per_tick() -> None:
    clock = Clock()
    hub = StatsHub(clock, INTERVAL, slices=40, per_tick=4)
    reads: list[int] = []

    for n in range(500):
        hub.add(Member(n, reads))  # type: ignore[arg-type]
    assert len(hub._slices) == 125
    clock.advance(INTERVAL / 40)  # the first tick, timed when one slice of 40 was there
    assert len(reads) == 4
    reads.clear()
    per_tick = reads_per_tick(clock, reads, 125, INTERVAL / 125)
    # One interval: every server read once, never more than 4 in one tick.
    assert sorted(reads) == list(range(500)) and max(per_tick) == 4
    # Fewer servers than the slices hold at that bound: the slices stay.
    small = StatsHub(clock, INTERVAL, slices=40, per_tick=4)
    for n in range(160):
        small.add(Member(n, reads))  # type: ignore[arg-type]
    assert len(small._slices) == 40


@pytest_twisted.ensureDeferred
async def test_a_reader_that_cannot_read_any_more_hands_over_to_the_engines_stream() -> None:
    from ctrlagent.errors import EngineError

    clock = Clock()
    engine = FakeEngine(clock)
    counting = CountingEngine(engine)
    hub = StatsHub(clock, INTERVAL, slices=SLICES)
    (cid,) = await _running(engine, 1)
    published: list[str] = []
    sampler = _sampler(counting, clock, hub, cid, published)
    sampler.start()
    assert len(hub) == 1 and counting.streams == 0

    def refused() -> Any:
        raise EngineError("cannot read memory.stat (Too many open files)")

    engine.stats_readers[0].read = refused  # type: ignore[method-assign]
    run_for(clock, INTERVAL)
    assert len(hub) == 0 and engine.stats_readers[0].closed
    assert counting.streams == 1  # the same run goes on, sampled by the engine
    sampler.stop()


@pytest_twisted.ensureDeferred
async def test_a_bug_in_one_servers_sample_never_stops_the_others_stats(
    fail_on_logged_errors: list,
) -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=1)  # every sampler on the same tick
    published: list[str] = []
    cids = await _running(engine, 3)
    samplers = [_sampler(engine, clock, hub, cid, published) for cid in cids]
    for sampler in samplers:
        sampler.start()

    def broken() -> Any:
        raise ValueError("a bug while reading")

    engine.stats_readers[0].read = broken  # type: ignore[method-assign]
    run_for(clock, INTERVAL * 3)
    # The broken one left the hub, its reader closed; the others go on being read.
    assert len(hub) == 2 and engine.stats_readers[0].closed
    assert [r.reads for r in engine.stats_readers[1:]] == [4, 4]
    assert [c for c in clock.getDelayedCalls() if c.func == hub._tick]
    [event] = fail_on_logged_errors  # logged once, as a bug
    assert "stats of server" in event["log_format"]
    fail_on_logged_errors.clear()
    for sampler in samplers:
        sampler.stop()


IDLE = 10.0


@pytest_twisted.ensureDeferred
async def test_unwatched_servers_are_read_once_per_idle_interval_and_every_interval_when_watched(
) -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES, idle_interval=IDLE)
    watched = [False]
    hub.live = lambda: watched[0]
    published: list[str] = []
    cids = await _running(engine, 16)
    for cid in cids:
        _sampler(engine, clock, hub, cid, published).start()
    assert all(r.reads == 1 for r in engine.stats_readers)  # the first read, at once

    def reads_over(seconds: float) -> list[int]:
        before = [r.reads for r in engine.stats_readers]
        run_for(clock, seconds)
        return [r.reads - b for r, b in zip(engine.stats_readers, before, strict=True)]

    # Nobody follows the figures: each read once per idle interval, the hub's
    # ticks that much further apart.
    reads_over(IDLE)
    ticks = hub.ticks
    assert reads_over(IDLE * 3) == [3] * 16
    assert hub.ticks - ticks == SLICES * 3
    # The Panel link connects: from the next tick on, every interval.
    watched[0] = True
    reads_over(IDLE / SLICES)
    ticks = hub.ticks
    assert reads_over(INTERVAL * 5) == [5] * 16
    assert hub.ticks - ticks == SLICES * 5
    # And back to the idle pace when it goes.
    watched[0] = False
    reads_over(IDLE)
    assert reads_over(IDLE * 2) == [2] * 16


@pytest_twisted.ensureDeferred
async def test_a_read_of_the_figures_gets_a_sample_at_most_one_interval_old() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES, idle_interval=IDLE)
    hub.live = lambda: False
    published: list[str] = []
    (cid,) = await _running(engine, 1)
    sampler = _sampler(engine, clock, hub, cid, published)
    sampler.start()
    (reader,) = engine.stats_readers
    # Just sampled: a reader takes it as it is.
    sampler.fresh()
    assert reader.reads == 1
    run_for(clock, INTERVAL * 1.5)
    assert reader.reads == 1  # the hub's next visit is an idle round away
    # Older than the interval: read now, published like any sample.
    sampler.fresh()
    assert reader.reads == 2 and sampler.sampled_at == clock.seconds()
    assert published == [cid, cid]
    sampler.fresh()
    assert reader.reads == 2
    # Stopped: nothing is read for a reader any more.
    sampler.stop()
    run_for(clock, IDLE)
    sampler.fresh()
    assert reader.reads == 2


@pytest_twisted.ensureDeferred
async def test_an_idle_interval_of_zero_reads_every_interval_whoever_watches() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    hub = StatsHub(clock, INTERVAL, slices=SLICES, idle_interval=0)
    hub.live = lambda: False
    cids = await _running(engine, 4)
    for cid in cids:
        _sampler(engine, clock, hub, cid, []).start()
    run_for(clock, INTERVAL * 4)
    assert all(r.reads == 5 for r in engine.stats_readers)


def test_slices_added_for_many_servers_go_when_most_of_them_leave() -> None:
    clock = Clock()
    hub = StatsHub(clock, INTERVAL, slices=40, per_tick=4)
    reads: list[int] = []
    members = [Member(n, reads) for n in range(500)]
    for member in members:
        hub.add(member)  # type: ignore[arg-type]
    assert len(hub._slices) == 125
    # 300 left need 75 slices: 125 is under twice that, they stay.
    for member in members[:200]:
        hub.discard(member)  # type: ignore[arg-type]
    assert len(hub._slices) == 125
    # 248 left need 62: 125 is twice that, the 248 are dealt over 62.
    for member in members[200:252]:
        hub.discard(member)  # type: ignore[arg-type]
    assert len(hub._slices) == 62 and len(hub) == 248
    assert {len(s) for s in hub._slices} == {4}
    clock.advance(INTERVAL / 40)  # the tick timed before the dealing
    reads.clear()
    per_tick = reads_per_tick(clock, reads, 62, INTERVAL / 62)
    # One interval at the new pace: each read once, 4 a tick.
    assert sorted(reads) == [m.n for m in members[252:]] and set(per_tick) == {4}
    # Never fewer than the base slices, however few servers are left.
    for member in members[252:-1]:
        hub.discard(member)  # type: ignore[arg-type]
    assert len(hub) == 1 and len(hub._slices) >= 40
