"""
Keeping the garbage collector's full passes out of the Panel's request latency.

CPython's cyclic collector now and then walks *every* tracked object: the
modules, classes and functions of Twisted, Klein, Autobahn and the agent, some
hundred thousand objects, which took 40-60 ms on a 2-core node (measured with
``gc.callbacks`` in the agent under ``bench/http_latency.py``).  A Panel
command arriving then waits for it.  What is alive once the agent has started
lives as long as the agent, so ``gc.freeze()`` moves it into the collector's
permanent generation: later passes only walk what the agent allocates while
serving.  Freezing changes nothing for reference counting: a frozen object that
is no longer referenced is still freed at once; only a cycle of frozen
objects would stay.

What the agent builds later lives long too: servers created after the start
(a node's whole fleet, when the Panel creates it), their consoles, pipelines
and timers.  Measured at 500 servers, full passes over them took 140-240 ms
each, every minute or two, stalling every request in flight.  So the freeze
is renewed every ``every`` seconds (a collection of what is not frozen yet,
cheap, then a freeze), and every ``thaw_every``-th time the whole heap is
thawed first, so that one full pass (about an hour apart by default) frees
the cycles of frozen objects dropped since (a deleted server's).
"""

from __future__ import annotations

import gc
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class Collector(Protocol):
    """The parts of the ``gc`` module used here (a fake in tests)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_freeze_count(self) -> int: ...


# Seconds from the start to the first freeze, how often the freeze is
# renewed, and every how many renewals the heap is thawed for one full
# collection.
FIRST_SECONDS = 10.0
EVERY_SECONDS = 300.0
THAW_EVERY = 12


class StartupHeapFreeze(Service):
    """
    Freezes the startup heap ``delay`` seconds after the agent has started
    (time enough, usually, for the server manager to reconcile its servers),
    renews the freeze every ``every`` seconds (thawing it first every
    ``thaw_every``-th time), and unfreezes it on stop.
    """

    name = "heap"
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        delay: float = FIRST_SECONDS,
        collector: Any = gc,
        every: float = EVERY_SECONDS,
        thaw_every: int = THAW_EVERY,
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._every = every
        self._thaw_every = max(1, thaw_every)
        self._gc: Collector = collector
        self._call: IDelayedCall | None = None
        self.frozen = 0
        self.rounds = 0

    def startService(self) -> None:  # noqa: N802 (Twisted hook)
        super().startService()
        self._call = self._clock.callLater(self._delay, self._freeze)

    def stopService(self) -> None:  # noqa: N802 (Twisted hook)
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.frozen:
            self._gc.unfreeze()
            self.frozen = 0

    def _freeze(self) -> None:
        self._call = None
        self.rounds += 1
        if self.frozen and self.rounds % self._thaw_every == 0:
            # One full pass now and then: cycles of frozen objects dropped since.
            self._gc.unfreeze()
        # Collect first, so that no garbage is frozen with the heap.
        self._gc.collect()
        self._gc.freeze()
        self.frozen = self._gc.get_freeze_count()
        if self.rounds == 1:
            self.log.info(
                "moved {count} startup objects out of the garbage collector's full passes",
                count=self.frozen,
            )
        else:
            self.log.debug("{count} objects kept out of the collector's full passes",
                           count=self.frozen)
        if self._every > 0:
            self._call = self._clock.callLater(self._every, self._freeze)
