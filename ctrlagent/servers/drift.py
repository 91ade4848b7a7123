"""
The drift check: a game's end that no engine event told.

The manager learns of a death from the engine's event stream.  An event the
engine never delivers (journald's rate limit under Podman, a death the
Podman events rule takes for an undone re-initialization because its
``start`` was lost, an engine bug) would leave the server reading
``running`` until the next reconcile, which comes only when the agent starts
or the engine comes back.

Every ``servers.drift_check_interval`` the check lists the managed containers
once (one engine call for every server) and compares: a server whose
container should be running with nothing under way (``Server.drift_key``)
but is listed down or absent is noted; at the next look, if it is still so
and nothing about it changed in between (no event heard, no state change, no
new run or death), its end is settled as the lost event would have settled
it (``Server.settle_unheard_end``).  Waiting one whole interval means a
``die`` that is merely late (read, or judged, after the list) is never
judged twice: it changes the key first.

Nothing is looked at while the engine is lost or a reconcile runs (that
reconcile settles every server), and what was noted is forgotten then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ctrlagent.engine.interface import ContainerState, IContainerEngine
from ctrlagent.errors import CtrlAgentError
from ctrlagent.servers.containers import MANAGED_LABEL
from ctrlagent.servers.server import Server
from ctrlagent.work import Tracker


class DriftCheck:
    """Periodic comparison of the servers' states with the engine's list."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        engine: IContainerEngine,
        servers: Callable[[], Iterable[Server]],
        settled: Callable[[], bool],
        tracker: Tracker,
        interval: float,
    ) -> None:
        self.clock = clock
        self.engine = engine
        self._servers = servers
        # False while the engine is lost or a reconcile runs.
        self._settled = settled
        self.tracker = tracker
        self.interval = interval
        # server id -> its drift key when it was first found down, and its
        # container as listed then (None: absent)
        self.noted: dict[str, tuple[tuple[Any, ...], ContainerState | None]] = {}
        self.looks = 0
        # Ends settled so (``ctrlagent_engine_unheard_ends_total``).
        self.settled = 0
        # Servers whose settling is under way (a slow inspect): not noted again.
        self._settling: set[str] = set()
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Look every ``interval`` seconds, the first one ``interval`` from now."""
        if self.interval <= 0 or self._loop is not None:
            return
        # Each look is the tracker's: shutdown cancels it and waits for it to
        # end before the engine and the store close (had the tracker held the
        # loop's own Deferred, a look under way would outlive the manager).
        loop = LoopingCall(lambda: self.tracker.run(self.look(), "drift check"))
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=False)

    @property
    def running(self) -> bool:
        """Whether looks are scheduled."""
        return self._loop is not None and self._loop.running

    def stop(self) -> None:
        """Look no more (a look under way is the tracker's to cancel)."""
        if self.running:
            assert self._loop is not None
            self._loop.stop()

    async def look(self) -> None:
        """One look: note the servers found down, settle those found down twice."""
        if not self._settled():
            self.noted.clear()
            return
        try:
            containers = await self.engine.list({MANAGED_LABEL: "true"})
        except CtrlAgentError as e:
            # The event stream tells the manager when the engine is lost.
            self.log.debug("drift check: the engine's list failed: {error}", error=e.message)
            return
        if not self._settled():
            self.noted.clear()
            return
        self.looks += 1
        listed = {c.id: c for c in containers}
        noted: dict[str, tuple[tuple[Any, ...], ContainerState | None]] = {}
        for server in self._servers():
            key = server.drift_key()
            if key is None or server.server_id in self._settling:
                continue
            found = listed.get(key[0])
            if found is not None and found.running:
                continue
            first = self.noted.get(server.server_id)
            if first is not None and first[0] == key:
                self.tracker.run(self._settle(server, key, first[1]),
                                 "settling server {}".format(server.server_id))
            else:
                noted[server.server_id] = (key, found)
        self.noted = noted

    async def _settle(
        self, server: Server, key: tuple[Any, ...], first: ContainerState | None,
    ) -> None:
        self._settling.add(server.server_id)
        try:
            if await server.settle_unheard_end(key, late=2 * self.interval, first=first):
                self.settled += 1
        except CtrlAgentError as e:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: settling an end no event told failed: {error}",
                server_id=server.server_id,
                error=e.message,
            )
        finally:
            self._settling.discard(server.server_id)
