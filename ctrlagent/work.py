"""
Tracking fire-and-forget work so that nothing fails silently and shutdown waits.

Every Deferred the agent does not await right away goes through a
``DeferredTracker``: its failure is logged (with a description of the work),
and ``wait()`` returns a Deferred that fires once all tracked work is done,
which ``stopService`` implementations return.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")


class DeferredTracker:
    """Keeps in-flight background work, logs its failures, lets shutdown wait."""

    log = Logger()

    def __init__(self) -> None:
        self._pending: set[Deferred[Any]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, d: Deferred[T], description: str) -> Deferred[T]:
        """Track ``d``; a failure is logged with ``description`` and swallowed."""
        self._pending.add(d)

        def done(result: Any) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    return None
                self.log.failure(
                    "background work failed: {description}", result, description=description
                )
            return None

        d.addBoth(done)
        return d

    def run(self, coro: Coroutine[Any, Any, T], description: str) -> Deferred[T]:
        """Start ``coro`` as tracked background work."""
        return self.track(Deferred.fromCoroutine(coro), description)

    def cancel_all(self) -> None:
        """Cancel every pending piece of work (used on shutdown)."""
        for d in list(self._pending):
            d.cancel()

    def wait(self) -> Deferred[None]:
        """Fire once everything tracked so far has finished."""
        if not self._pending:
            return succeed(None)
        d: Deferred[Any] = DeferredList(list(self._pending), consumeErrors=True)
        return d.addCallback(lambda _: None)
