"""The background-work tracker logs failures and lets shutdown wait."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from ctrlagent.work import DeferredTracker


def test_wait_fires_after_all_tracked_work(fail_on_logged_errors: list) -> None:
    tracker = DeferredTracker()
    a: Deferred[int] = Deferred()
    b: Deferred[int] = Deferred()
    tracker.track(a, "a")
    tracker.track(b, "b")
    done: list[None] = []
    tracker.wait().addCallback(done.append)
    a.callback(1)
    assert done == []
    b.errback(RuntimeError("boom"))
    assert done == [None]
    assert len(tracker) == 0
    # The failure was logged (and is expected here).
    assert any("background work failed" in str(e.get("log_format")) for e in fail_on_logged_errors)
    fail_on_logged_errors.clear()


def test_cancelled_work_is_not_an_error() -> None:
    tracker = DeferredTracker()
    d: Deferred[int] = Deferred()
    tracker.track(d, "cancel me")
    tracker.cancel_all()
    assert len(tracker) == 0
