"""
The agent's service tree at stop: the children stop first (in reverse
order), then the background work still held by the root tracker (answers
already given, such as a late command) is cancelled and waited for.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred

from ctrlagent.tap import AgentService
from ctrlagent.work import Tracker


class _SlowStop(Service):
    """A child whose stop finishes when the test says so."""

    def __init__(self, name: str, stops: list[str]) -> None:
        self.name = name
        self.stops = stops
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted hook)
        super().stopService()
        self.stops.append(self.name)
        return self.stopped


def _fired(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_stop_waits_for_the_children_then_for_the_work_left_in_the_tracker() -> None:
    tracker = Tracker("agent")
    top = AgentService(tracker)
    stops: list[str] = []
    first, second = _SlowStop("servers", stops), _SlowStop("http", stops)
    first.setServiceParent(top)
    second.setServiceParent(top)
    top.startService()

    # Late work: its answer was given, it goes on, and on cancel it needs a
    # moment to put things back before it ends.
    cleanup: Deferred[None] = Deferred()
    cleaned: list[str] = []

    async def late_work() -> None:
        try:
            await Deferred()
        except CancelledError:
            cleaned.append("cancelled")
            await cleanup
            cleaned.append("late work")
            raise

    tracker.scope("late answers").run(late_work(), "a late command")

    stopped = _fired(top.stopService())
    assert stops == ["http", "servers"]
    # The children are still stopping: their work is not touched yet.
    assert len(tracker) == 1 and cleaned == []
    second.stopped.callback(None)
    first.stopped.callback(None)
    # The children are done: the work left is cancelled and waited for.
    assert cleaned == ["cancelled"]
    assert stopped == [] and len(tracker) == 1
    cleanup.callback(None)
    assert cleaned == ["cancelled", "late work"]
    assert stopped == [None]
    assert len(tracker) == 0


def test_stop_without_work_left_fires_once_the_children_stopped() -> None:
    top = AgentService(Tracker("agent"))
    child = _SlowStop("servers", [])
    child.setServiceParent(top)
    top.startService()
    stopped = _fired(top.stopService())
    assert stopped == []
    child.stopped.callback(None)
    assert stopped == [None]
    assert not top.running
