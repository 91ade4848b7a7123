"""
Background work and deadlines: one tracker and one deadline helper.

Every Deferred the agent does not await right away goes through a
``Tracker``: its failure is logged (with a description of the work), and
``wait()`` returns a Deferred that fires once all tracked work is done, which
``stopService`` implementations return.  ``tap.py`` builds one root tracker
and hands each service its own ``scope()``: a service cancels and waits only
its share (waiting on the root would hang one service's shutdown behind
another's long background stop), while the root still sees all of it.

``Deadlines`` is the one place that answers "by when": ``within`` tells
whether work finished in time without ever cancelling it, ``answer_by``
answers with a fallback at the deadline and hands the late work to the
tracker, and ``shielded`` lets a caller (an HTTP client) go away without
cancelling the work it started.  Every deadline's length comes from the
``[timeouts]`` section of the configuration (``TimeoutsConfig``).

``async_to_deferred``: our code is ``async def``; Twisted's callers get a
Deferred.  Inside the agent every step awaits (Deferreds are awaitable), so
methods are written as coroutines.  Their callers on the Twisted side need a
``Deferred``: ``LoopingCall`` and ``DeferredSemaphore.run`` wait on what the
function returns, ``stopService`` must return one, and callers (the action
dispatcher, tests) chain ``addCallback``/``addErrback`` or cancel it.  A bare
coroutine would do none of that, and would not even start until awaited.  The
decorator is the one place where the conversion happens (as tahoe-lafs's
``async_to_deferred``): the coroutine starts at once, runs to its first
``await`` before the call returns, and its result or exception fires the
Deferred.  Cancelling the Deferred cancels the Deferred the coroutine is
awaiting at that moment (``Deferred.fromCoroutine``'s behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from ctrlagent.config import TimeoutsConfig
from ctrlagent.errors import CtrlAgentError

P = ParamSpec("P")
T = TypeVar("T")

# What the helpers take: a Deferred, or a coroutine that they start.
Work = Deferred[T] | Coroutine[Any, Any, T]


def async_to_deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """
    Wrap the coroutine function ``f`` so that calling it returns a ``Deferred``.

    Same name, docstring and signature (``inspect.signature`` follows
    ``__wrapped__``; mypy keeps the parameters through ``ParamSpec``).
    """

    @wraps(f)
    def to_deferred(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return to_deferred


def _deferred(work: Work[T]) -> Deferred[T]:
    if isinstance(work, Deferred):
        return work
    return Deferred.fromCoroutine(work)


def is_cancellation(failure: Failure) -> bool:
    """
    True when ``failure`` is work being cancelled, however Twisted words it.

    A cancelled connect fails with ``ConnectingCancelledError`` and a
    cancelled HTTP request with ``ResponseNeverReceived``/``ResponseFailed``
    wrapping a ``CancelledError``, neither a ``CancelledError`` itself:
    shutting down mid-connect is not a bug to log with a traceback.
    """
    if failure.check(CancelledError, ConnectingCancelledError):
        return True
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return bool(reasons) and all(
            isinstance(r, Failure) and is_cancellation(r) for r in reasons
        )
    return False


class Tracker:
    """
    Keeps in-flight background work, logs its failures, lets shutdown wait.

    A tracker made by ``scope(name)`` is a service's own share: its work is
    also held by its parent (and so on up to the root), but ``cancel_all``
    and ``wait`` on the scope touch only the scope's work.
    """

    log = Logger()

    def __init__(self, name: str = "agent", parent: Tracker | None = None) -> None:
        self.name = name
        self._parent = parent
        # Each piece of work -> the Deferreds of wait() calls that wait for it.
        self._pending: dict[Deferred[Any], list[Deferred[None]]] = {}
        # How many times each piece is held here (two scopes may hold the same).
        self._holds: dict[Deferred[Any], int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return "<Tracker {} ({} pending)>".format(self.name, len(self._pending))

    def scope(self, name: str) -> Tracker:
        """A child tracker for one service; its work is also this tracker's."""
        return Tracker(name, parent=self)

    def _register(self, d: Deferred[Any]) -> None:
        tracker: Tracker | None = self
        while tracker is not None:
            tracker._pending.setdefault(d, [])
            tracker._holds[d] = tracker._holds.get(d, 0) + 1
            tracker = tracker._parent

    def _release(self, d: Deferred[Any]) -> None:
        tracker: Tracker | None = self
        while tracker is not None:
            left = tracker._holds.pop(d, 1) - 1
            if left > 0:
                tracker._holds[d] = left
            else:
                for waiter in tracker._pending.pop(d, []):
                    waiter.callback(None)
            tracker = tracker._parent

    def hold(self, d: Deferred[T]) -> Deferred[T]:
        """
        Hold ``d`` (for ``wait`` and ``cancel_all``) and return it with its
        result untouched: for work whose outcome its caller still reads.
        """
        self._register(d)

        def done(result: Any) -> Any:
            self._release(d)
            return result

        d.addBoth(done)
        return d

    def track(self, d: Deferred[T], description: str) -> Deferred[T]:
        """Track ``d``; a failure is logged with ``description`` and swallowed."""

        def logged(result: Any) -> None:
            if not isinstance(result, Failure) or is_cancellation(result):
                return None
            if result.check(CtrlAgentError):
                # A coded error (a full disk, a vanished container) is the
                # world, not a bug: its message says all, no traceback.
                self.log.warn(  # noqa: G010 - twisted.logger's method
                    "background work failed: {description}: {error}",
                    description=description,
                    error=str(result.value),
                )
                return None
            self.log.failure(
                "background work failed: {description}", result, description=description
            )
            return None

        self._register(d)
        d.addBoth(logged)
        d.addBoth(lambda _: self._release(d))
        return d

    def run(self, work: Work[T], description: str) -> Deferred[T]:
        """Start ``work`` (a coroutine, or a Deferred) as tracked background work."""
        return self.track(_deferred(work), description)

    def cancel_all(self) -> None:
        """Cancel every pending piece of this tracker's work (used on shutdown)."""
        for d in list(self._pending):
            d.cancel()

    def wait(self) -> Deferred[None]:
        """Fire once everything this tracker holds so far has finished."""
        if not self._pending:
            return succeed(None)
        waiters: list[Deferred[Any]] = []
        for pending in self._pending.values():
            waiter: Deferred[None] = Deferred()
            pending.append(waiter)
            waiters.append(waiter)
        d: Deferred[Any] = DeferredList(waiters)
        return d.addCallback(lambda _: None)


# The name the rest of the agent grew up with.
DeferredTracker = Tracker


class Deadlines:
    """
    The one deadline helper: every "answer by" of the agent goes through it.

    ``clock`` measures the time; ``tracker`` takes the work that outlives
    its answer; ``timeouts`` holds every deadline's length.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, tracker: Tracker, timeouts: TimeoutsConfig) -> None:
        self.clock = clock
        self.tracker = tracker
        self.timeouts = timeouts

    async def within(self, work: Work[Any], seconds: float) -> bool:
        """
        True if ``work`` finishes (either way) within ``seconds``, else False.

        ``work`` itself is never cancelled, nor is its result consumed: whoever
        else holds it still sees its outcome.
        """
        d: Deferred[Any] = _deferred(work)
        if d.called:
            return True
        waiter: Deferred[bool] = Deferred()

        def fired(result: object) -> object:
            if not waiter.called:
                waiter.callback(True)
            return result

        def expire() -> None:
            if not waiter.called:
                waiter.callback(False)

        d.addBoth(fired)
        timer = self.clock.callLater(seconds, expire)
        try:
            return await waiter
        finally:
            if timer.active():
                timer.cancel()

    async def answer_by(
        self, work: Work[T], seconds: float, *, what: str, fallback: Callable[[], T]
    ) -> T:
        """
        ``work``'s result if it comes within ``seconds``, else ``fallback()``
        (which may raise instead).

        Late work goes on: from the deadline the tracker owns its outcome and
        logs its failure under ``what``.
        """
        d: Deferred[T] = _deferred(work)
        if d.called:
            return await d
        answered: Deferred[T] = Deferred()

        def on_deadline() -> None:
            self.log.info(
                "{description} still running after {seconds}s; answering now",
                description=what,
                seconds=seconds,
            )
            self.tracker.track(d, what)
            try:
                answered.callback(fallback())
            except Exception:
                answered.errback()

        timer = self.clock.callLater(seconds, on_deadline)

        def settled(result: Any) -> Any:
            if not timer.active():
                # Already answered at the deadline: the tracker takes it from here.
                return result
            timer.cancel()
            answered.callback(result)
            return None

        d.addBoth(settled)
        return await answered

    def sleep(self, seconds: float) -> Deferred[None]:
        """A Deferred that fires after ``seconds`` on the clock (cancellable)."""
        d: Deferred[None] = Deferred(lambda _: timer.cancel())
        timer = self.clock.callLater(seconds, d.callback, None)
        return d

    def shielded(
        self,
        d: Deferred[T],
        *,
        what: str,
        expected: tuple[type[BaseException], ...] = (),
    ) -> Deferred[T]:
        """
        A Deferred with ``d``'s outcome, whose cancellation never cancels ``d``.

        Once the answer is cancelled (its reader went away), ``d`` belongs to
        the tracker, which logs a failure under ``what`` unless it is one of
        ``expected`` (an outcome nobody reads any more, not a fault).
        """
        answer: Deferred[T] = Deferred()

        def settled(result: Any) -> Any:
            if not answer.called:
                answer.callback(result)
                return None
            if isinstance(result, Failure) and result.check(*expected):
                return None
            return result

        def abandoned(failure: Failure) -> Failure:
            if failure.check(CancelledError) and not d.called:
                self.tracker.track(d, what)
            return failure

        d.addBoth(settled)
        answer.addErrback(abandoned)
        return answer
