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
objects would stay (the agent builds none at startup that it drops later).
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


class StartupHeapFreeze(Service):
    """
    Freezes the startup heap ``delay`` seconds after the agent has started
    (time enough, usually, for the server manager to reconcile its servers),
    and unfreezes it on stop.
    """

    name = "heap"
    log = Logger()

    def __init__(self, clock: IReactorTime, delay: float = 10.0, collector: Any = gc) -> None:
        self._clock = clock
        self._delay = delay
        self._gc: Collector = collector
        self._call: IDelayedCall | None = None
        self.frozen = 0

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
        # Collect first, so that no garbage of the startup is frozen with it.
        self._gc.collect()
        self._gc.freeze()
        self.frozen = self._gc.get_freeze_count()
        self.log.info(
            "moved {count} startup objects out of the garbage collector's full passes",
            count=self.frozen,
        )
