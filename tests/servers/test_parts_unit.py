"""
The parts of a ``Server`` on their own, without a manager: the console
pipeline (``ConsolePipeline``), the stats sampler (``StatsSampler``) and the
event bus (``EventBus``).  No engine, no real time.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from ctrlagent.config import ServersConfig
from ctrlagent.engine.interface import LogLine, StatsSample
from ctrlagent.events import ConsoleOutput, ServerEvent
from ctrlagent.interfaces import IConsoleConsumer
from ctrlagent.servers.console import ConsolePipeline, Line, MarkFilter
from ctrlagent.servers.delivery import EventBus
from ctrlagent.servers.stats import StatsSampler
from ctrlagent.testing.engine import FakeEngine
from ctrlagent.work import Tracker

BASE_NS = 1_893_456_000_000_000_000


def line(n: int, text: str, stream: str = "stdout") -> LogLine:
    """A console line stamped ``n`` ns after ``BASE_NS`` (2030-01-01)."""
    return LogLine(BASE_NS + n, stream, text)


class Delivered:
    def __init__(self) -> None:
        self.calls: list[tuple[list[ConsoleOutput], list[Any], Any]] = []
        self.order: list[str] = []

    def __call__(self, server_id: str, events: list[ConsoleOutput], marks: list[Any],
                 mark: Any) -> None:
        self.order.append("deliver")
        self.calls.append((events, marks, mark))


def pipeline(clock: Clock, delivered: Delivered, done: list[str], limit: int = 100,
             starting: bool = True) -> ConsolePipeline:
    def seen(lines: list[Line]) -> bool:
        return starting and any("Done" in line.text for line in lines)

    def startup_done() -> None:
        delivered.order.append("done")
        done.append("done")

    return ConsolePipeline(
        "s1", engine=FakeEngine(clock), clock=clock, tracker=Tracker("test"), deadlines=None,
        buffer_lines=10, throttle_lines=limit, throttle_interval=1.0,
        deliver=delivered, startup_seen=seen, startup_done=startup_done,
    )


def test_taken_lines_are_delivered_before_the_startup_is_reported_done() -> None:
    clock, delivered, done = Clock(), Delivered(), []
    console = pipeline(clock, delivered, done)
    console.take([line(5, "Starting"), line(7, "Done (1s)")], None)
    assert done == ["done"] and delivered.order == ["deliver", "done"]
    events, marks, mark = delivered.calls[0]
    assert [(e.stream, e.lines) for e in events] == [("stdout", ["Starting", "Done (1s)"])]
    assert marks == [(BASE_NS + 7, 1)] and mark == (BASE_NS + 7, 1)
    assert (console.mark, console.mark_count, console.lines_total) == (BASE_NS + 7, 1, 2)
    assert console.history(5) == ["Starting", "Done (1s)"]


def test_a_filter_drops_what_the_mark_covers_and_the_history_keeps_only_that() -> None:
    clock, delivered, done = Clock(), Delivered(), []
    console = pipeline(clock, delivered, done, starting=False)
    batch = [line(n, "line {}".format(n)) for n in (1, 2, 2, 3)]
    console.take_history(batch, MarkFilter(BASE_NS + 2, 1))
    assert console.history(10) == ["line 1", "line 2"]
    console.take(batch, MarkFilter(BASE_NS + 2, 1))
    assert [e.lines for e in delivered.calls[0][0]] == [["line 2", "line 3"]]
    assert done == []


def test_notices_go_to_the_buffer_and_out_without_a_mark() -> None:
    clock, delivered, done = Clock(), Delivered(), []
    console = pipeline(clock, delivered, done)
    clock.advance(3)
    console.notice("hello")
    events, marks, mark = delivered.calls[0]
    assert [(e.stream, e.lines, e.timestamp) for e in events] == [
        ("agent", ["[ctrlagent] hello"], 3.0)]
    assert marks == [None] and mark is None
    assert console.lines_total == 1 and not console.attached and not console.stdin_connected


class StatsEngine:
    """Counts ``stats`` calls, answering one fixed sample."""

    def __init__(self) -> None:
        self.calls = 0

    def stats(self, cid: str) -> Any:
        self.calls += 1
        return succeed(StatsSample(12.5, 50 * 1024 * 1024, 64 * 1024 * 1024, 100, 200, 0, 0, 3))


def test_the_sampler_polls_on_the_interval_while_active_and_stops() -> None:
    clock, docker, samples = Clock(), StatsEngine(), []
    active = [True]
    sampler = StatsSampler(
        "s1", engine=docker, clock=clock, tracker=Tracker("test"),
        config=ServersConfig(stats_interval=2.0, stats_mode="poll"),
        container_id=lambda: "c1", active=lambda: active[0],
        on_sample=lambda: samples.append(dict(sampler.latest)),
    )
    sampler.start()
    clock.advance(2.0)  # the offset within the first interval
    assert docker.calls == 1 and samples[0]["cpu"] == 12.5 and samples[0]["memory"] == 50.0
    clock.advance(2.0)
    assert docker.calls == 2
    active[0] = False
    clock.advance(2.0)
    assert docker.calls == 2  # not active: no sample, no next tick
    active[0] = True
    sampler.start()
    sampler.stop()
    clock.advance(10.0)
    assert docker.calls == 2 and not clock.getDelayedCalls()


@implementer(IConsoleConsumer)
class Consumer:
    def __init__(self) -> None:
        self.events: list[ServerEvent] = []

    def __call__(self, event: ServerEvent) -> None:
        self.events.append(event)


def test_the_bus_takes_one_acknowledging_consumer_and_forgets_it_on_removal() -> None:
    bus = EventBus()
    first, second, plain = Consumer(), Consumer(), []
    bus.add(first)
    bus.add(plain.append)
    with pytest.raises(RuntimeError):
        bus.add(second)
    event = ConsoleOutput("s1", "stdout", ["x"], 1.0)
    bus.fan_out([event])
    assert first.events == [event] and plain == [event]
    bus.remove(first)
    assert bus.consumer is None and bus.had_consumer
    bus.add(second)
    assert bus.consumer is second
    bus.dead = True
    bus.emit(event)
    assert second.events == []


def test_a_listener_without_the_console_gets_every_other_event() -> None:
    from ctrlagent.events import StatusChanged

    bus = EventBus()
    quiet: list[ServerEvent] = []
    everything: list[ServerEvent] = []
    bus.add(quiet.append, console=False)
    bus.add(everything.append)
    bus.add(everything.append)  # once only
    line_event = ConsoleOutput("s1", "stdout", ["x"], 1.0)
    status = StatusChanged("s1", "starting", "running", 1.0)
    bus.fan_out([line_event])
    bus.emit(status)
    assert quiet == [status]
    assert everything == [line_event, status]
    bus.remove(quiet.append)
    bus.emit(status)
    assert quiet == [status]
    # an acknowledging consumer gets the console whatever it asks
    consumer = Consumer()
    bus.add(consumer, console=False)
    bus.fan_out([line_event])
    assert consumer.events == [line_event]


def test_the_fake_manager_subscribes_listeners_as_the_real_bus_does() -> None:
    from ctrlagent.events import StatusChanged
    from ctrlagent.testing.servers import FakeServerManager

    fake = FakeServerManager()
    bus = EventBus()
    line_event = ConsoleOutput("s1", "stdout", ["x"], 1.0)
    status = StatusChanged("s1", "starting", "running", 1.0)
    got: dict[str, list[ServerEvent]] = {}
    for name, add, publish in (
        ("fake", fake.add_listener, lambda e: fake._emit(e)),
        ("bus", bus.add, lambda e: bus.fan_out([e]) if isinstance(e, ConsoleOutput)
         else bus.emit(e)),
    ):
        quiet: list[ServerEvent] = []
        everything: list[ServerEvent] = []
        add(quiet.append, False)
        add(everything.append)
        add(everything.append)
        publish(line_event)
        publish(status)
        got[name + " quiet"], got[name + " all"] = quiet, everything
    assert got["fake quiet"] == got["bus quiet"] == [status]
    assert got["fake all"] == got["bus all"] == [line_event, status]
