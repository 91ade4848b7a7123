"""The tracker logs failures and lets shutdown wait; the deadline helper answers in time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from ctrlagent.config import AgentConfig, PanelConfig, SftpConfig, TimeoutsConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.tap import build_service
from ctrlagent.work import Deadlines, DeferredTracker, Tracker, is_cancellation


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


def test_hold_keeps_the_result_for_its_reader_and_lets_wait_see_it() -> None:
    tracker = Tracker()
    d: Deferred[int] = Deferred()
    held = tracker.hold(d)
    waited = tracker.wait()
    assert len(tracker) == 1 and not waited.called
    d.callback(7)
    assert waited.called and len(tracker) == 0
    assert held.result == 7  # the result passed through untouched


def test_a_scope_is_its_own_share_and_also_the_parents() -> None:
    root = Tracker("agent")
    servers, http = root.scope("servers"), root.scope("http")
    a: Deferred[None] = Deferred()
    b: Deferred[None] = Deferred()
    servers.track(a, "a long background stop")
    http.track(b, "a command")
    assert (len(root), len(servers), len(http)) == (2, 1, 1)
    # The API's scope waits for its own work, not behind the servers' stop.
    http_done = http.wait()
    root_done = root.wait()
    b.callback(None)
    assert http_done.called and not root_done.called
    # Cancelling one scope leaves the other's work alone.
    http.cancel_all()
    assert not a.called
    servers.cancel_all()
    assert a.called and root_done.called and len(root) == 0


def test_work_held_by_two_scopes_stays_with_the_parent_until_both_let_go() -> None:
    root = Tracker()
    first, second = root.scope("first"), root.scope("second")
    d: Deferred[int] = Deferred()
    second.track(first.hold(d), "held twice")
    assert (len(root), len(first), len(second)) == (1, 1, 1)
    d.callback(1)
    assert (len(root), len(first), len(second)) == (0, 0, 0)


def _deadlines(clock: Clock, **timeouts: float) -> Deadlines:
    return Deadlines(clock, Tracker("late"), TimeoutsConfig(**timeouts))


def _outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no answer yet"
    return results[0]


def test_answer_by_answers_at_the_deadline_with_the_fallback() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    work: Deferred[str] = Deferred()
    answer = Deferred.fromCoroutine(
        deadlines.answer_by(work, 25, what="create s1", fallback=lambda: "installing")
    )
    clock.advance(24.9)
    assert not answer.called
    clock.advance(0.1)
    assert _outcome(answer) == "installing"
    # The late work goes on under the tracker, not cancelled.
    assert len(deadlines.tracker) == 1 and not work.called
    work.callback("done")
    assert len(deadlines.tracker) == 0


def test_answer_by_passes_work_that_comes_in_time_and_leaves_no_timer() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    work: Deferred[str] = Deferred()
    answer = Deferred.fromCoroutine(
        deadlines.answer_by(work, 25, what="stop s1", fallback=lambda: "stopping")
    )
    clock.advance(10)
    work.callback("offline")
    assert _outcome(answer) == "offline"
    assert clock.getDelayedCalls() == []
    assert len(deadlines.tracker) == 0


def test_answer_by_a_fallback_that_raises_is_the_answer() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    work: Deferred[str] = Deferred()

    def still_running() -> str:
        raise CtrlAgentError("still running", code="EXECUTION_ERROR")

    answer = Deferred.fromCoroutine(
        deadlines.answer_by(work, 27, what="read_file s1", fallback=still_running)
    )
    clock.advance(27)
    failure = _outcome(answer)
    assert isinstance(failure, Failure) and failure.value.code == "EXECUTION_ERROR"
    work.callback("late and quiet")
    assert len(deadlines.tracker) == 0


def test_answer_by_logs_the_failure_of_late_work(fail_on_logged_errors: list) -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    work: Deferred[str] = Deferred()
    answer = Deferred.fromCoroutine(
        deadlines.answer_by(work, 25, what="create s1", fallback=lambda: "installing")
    )
    clock.advance(25)
    assert _outcome(answer) == "installing"
    work.errback(RuntimeError("pull failed"))
    assert len(deadlines.tracker) == 0
    [event] = fail_on_logged_errors
    assert event["description"] == "create s1"
    fail_on_logged_errors.clear()


def test_within_tells_whether_work_finished_in_time_and_never_cancels_it() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    late: Deferred[int] = Deferred()
    in_time = Deferred.fromCoroutine(deadlines.within(late, 10))
    clock.advance(10)
    assert _outcome(in_time) is False
    assert not late.called  # not cancelled
    quick: Deferred[int] = Deferred()
    in_time = Deferred.fromCoroutine(deadlines.within(quick, 10))
    clock.advance(9)
    quick.errback(RuntimeError("exited badly"))
    assert _outcome(in_time) is True
    # The outcome is left to whoever else holds the work.
    assert isinstance(_outcome(quick), Failure)
    assert clock.getDelayedCalls() == []
    already: Deferred[int] = Deferred()
    already.callback(1)
    assert _outcome(Deferred.fromCoroutine(deadlines.within(already, 0))) is True


def test_within_accepts_a_coroutine() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)

    async def pause() -> None:
        await deadlines.sleep(3)

    answer = Deferred.fromCoroutine(deadlines.within(pause(), 5))
    clock.advance(3)
    assert _outcome(answer) is True


def test_cancelling_a_shielded_answer_never_cancels_the_work(
    fail_on_logged_errors: list,
) -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    work: Deferred[str] = Deferred()
    answer = deadlines.shielded(work, what="stop s1 after its client left")
    answer.cancel()
    assert answer.called and not work.called
    assert isinstance(_outcome(answer), Failure)
    # Abandoned work belongs to the tracker, which logs its failure.
    assert len(deadlines.tracker) == 1
    work.errback(RuntimeError("docker went away"))
    assert len(deadlines.tracker) == 0
    [event] = fail_on_logged_errors
    assert event["description"] == "stop s1 after its client left"
    fail_on_logged_errors.clear()


def test_an_abandoned_answers_expected_failure_is_quiet() -> None:
    deadlines = _deadlines(Clock())
    work: Deferred[str] = Deferred()
    answer = deadlines.shielded(work, what="stop s1", expected=(CtrlAgentError,))
    answer.cancel()
    answer.addErrback(lambda f: f.trap(CancelledError))
    work.errback(CtrlAgentError("no such server", code="SERVER_NOT_FOUND"))
    assert len(deadlines.tracker) == 0  # and the autouse fixture saw no error


def test_a_shielded_answer_carries_the_works_outcome() -> None:
    deadlines = _deadlines(Clock())
    work: Deferred[str] = Deferred()
    answer = deadlines.shielded(work, what="start s1")
    work.callback("running")
    assert _outcome(answer) == "running"
    failing: Deferred[str] = Deferred()
    answer = deadlines.shielded(failing, what="start s1")
    failing.errback(CtrlAgentError("conflict", code="CONFLICT"))
    assert _outcome(answer).value.code == "CONFLICT"
    assert len(deadlines.tracker) == 0


def test_sleep_fires_after_its_seconds_and_can_be_cancelled() -> None:
    clock = Clock()
    deadlines = _deadlines(clock)
    nap = deadlines.sleep(2)
    clock.advance(1.9)
    assert not nap.called
    clock.advance(0.1)
    assert nap.called
    other = deadlines.sleep(2)
    other.cancel()
    assert clock.getDelayedCalls() == []
    other.addErrback(lambda f: f.trap(CancelledError))


def test_deadlines_read_their_lengths_from_the_timeouts_section() -> None:
    deadlines = _deadlines(Clock(), command_answer=5, command_margin=1)
    assert deadlines.timeouts.command_answer == 5
    assert deadlines.timeouts.command_margin == 1
    assert TimeoutsConfig() == TimeoutsConfig(
        command_answer=25, command_margin=2, http_drain=10, engine_ping=3, engine_ping_cache=1.5
    )


@pytest_twisted.ensureDeferred
async def test_the_agent_shares_one_tracker_and_one_deadline_helper(tmp_path: Path) -> None:
    config = AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        timeouts=TimeoutsConfig(command_answer=7, http_drain=4),
        sftp=SftpConfig(endpoint="tcp:0:interface=127.0.0.1"),
        panel=PanelConfig(url="ws://127.0.0.1:1/agent"),  # a link to build
    )
    (tmp_path / "state").mkdir()
    from twisted.internet import reactor

    # Only built, never started: nothing listens, dials or runs.
    top = build_service(reactor, config)
    servers = top.getServiceNamed("servers")
    link = top.getServiceNamed("panel")
    api = top.getServiceNamed("http")._api
    try:
        # One deadline helper, reading the configured deadlines ...
        assert servers.deadlines is api._deadlines is link._dispatcher._deadlines
        assert servers.deadlines.timeouts.command_answer == 7
        assert top.getServiceNamed("http")._drain_timeout == 4
        # ... and one root tracker, of which each service holds its own scope.
        backups = top.getServiceNamed("backups")
        scopes = [servers.tracker, api._tracker, link._tracker, servers.deadlines.tracker,
                  backups.tracker]
        assert len({id(scope) for scope in scopes}) == 5
        roots = {id(scope._parent) for scope in scopes}
        assert len(roots) == 1 and None not in {scope._parent for scope in scopes}
        # The root is the top service's, which waits for it after its children.
        assert roots == {id(top.tracker)}
    finally:
        await servers.store.close()
        await top.getServiceNamed("backups").store.close()


def test_a_coded_error_in_background_work_is_a_warning_without_a_traceback(
    warnings: list[dict[str, Any]],
) -> None:
    from twisted.internet.defer import fail

    from ctrlagent.errors import InsufficientResources

    tracker = Tracker()
    tracker.track(fail(InsufficientResources("the agent's state disk is full")), "store s1")
    (event,) = [e for e in warnings if "background work failed" in e["log_format"]]
    assert event["description"] == "store s1"
    assert event["error"] == "the agent's state disk is full"
    assert "log_failure" not in event


def test_a_cancelled_connect_or_request_is_not_an_error(fail_on_logged_errors: list) -> None:
    """Shutdown cancels a connect or a request: Twisted words it differently, still no error."""
    tracker = DeferredTracker()
    connect: Deferred[int] = Deferred(lambda d: d.errback(ConnectingCancelledError("/x.sock")))
    request: Deferred[int] = Deferred(
        lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
    tracker.track(connect, "connect")
    tracker.track(request, "request")
    tracker.cancel_all()
    assert len(tracker) == 0
    assert fail_on_logged_errors == []
    # A request that failed for another reason is still an error.
    assert not is_cancellation(Failure(ResponseNeverReceived([Failure(ValueError("boom"))])))
    assert not is_cancellation(Failure(ResponseNeverReceived([])))
