"""
``MeteredEngine``: the one wrapper at the engine seam that counts and times
every call the server domain makes to its container engine.

It implements ``IContainerEngine`` by handing each call to the real engine
and telling an observer ``(operation, seconds, ok)`` when the call is done.
Operations are the interface's method names (a fixed set).  The calls that
open a stream (``output``, ``stats_stream``, ``events``) are counted when
opened; their stream's life is not a latency.  Anything else an engine has
(``close``, its ``name``) is reached through as is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ctrlagent.engine.interface import (
    ContainerSpec,
    ContainerState,
    IContainerEngine,
    IEventStream,
    ILogStream,
    IStatsReader,
    IStdinPipe,
    ResourceLimits,
    StatsSample,
)
from ctrlagent.errors import EngineError

T = TypeVar("T")

# (operation, seconds, ok)
EngineObserver = Callable[[str, float, bool], None]


@implementer(IContainerEngine)
class MeteredEngine:
    """``engine`` with every call reported to ``observe`` (timed on ``clock``)."""

    def __init__(self, engine: Any, observe: EngineObserver, clock: IReactorTime) -> None:
        self._engine = engine
        # The runtime's own engine, for those who ask which one it is.
        self.wrapped = engine
        self._observe = observe
        self._clock = clock

    @property
    def name(self) -> str:
        return str(self._engine.name)

    def __getattr__(self, attribute: str) -> Any:
        # Only for what the interface does not name (close, and a runtime's extras).
        return getattr(self._engine, attribute)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = self._clock.seconds()
        ok = False
        try:
            result = await call
            ok = True
            return result
        finally:
            self._observe(operation, self._clock.seconds() - start, ok)

    def _opened(self, operation: str, opener: Callable[[], T]) -> T:
        ok = False
        try:
            stream = opener()
            ok = True
            return stream
        finally:
            self._observe(operation, 0.0, ok)

    async def ping(self) -> bool:
        return await self._timed("ping", self._engine.ping())

    async def version(self) -> str | None:
        return await self._timed("version", self._engine.version())

    async def ensure_image(self, ref: str) -> None:
        await self._timed("ensure_image", self._engine.ensure_image(ref))

    async def ensure_network(
        self, name: str, subnet: str | None, labels: Mapping[str, str]
    ) -> None:
        await self._timed("ensure_network", self._engine.ensure_network(name, subnet, labels))

    async def create(self, spec: ContainerSpec) -> str:
        return await self._timed("create", self._engine.create(spec))

    def last_warnings(self, cid: str) -> tuple[str, ...]:
        return tuple(self._engine.last_warnings(cid))

    async def start(self, cid: str) -> None:
        await self._timed("start", self._engine.start(cid))

    async def kill(self, cid: str, signal: str = "SIGKILL") -> None:
        await self._timed("kill", self._engine.kill(cid, signal))

    async def wait(self, cid: str) -> int:
        return await self._timed("wait", self._engine.wait(cid))

    async def inspect(self, cid: str) -> ContainerState:
        return await self._timed("inspect", self._engine.inspect(cid))

    async def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        return await self._timed("list", self._engine.list(labels))

    async def remove(self, cid_or_name: str) -> None:
        await self._timed("remove", self._engine.remove(cid_or_name))

    async def update_limits(self, cid: str, limits: ResourceLimits) -> None:
        await self._timed("update_limits", self._engine.update_limits(cid, limits))

    def output(
        self, cid: str, *, follow: bool, since_ns: int | None = None, tail: int | None = None
    ) -> ILogStream:
        return self._opened(
            "output",
            lambda: self._engine.output(cid, follow=follow, since_ns=since_ns, tail=tail),
        )

    async def open_stdin(self, cid: str) -> IStdinPipe:
        return await self._timed("open_stdin", self._engine.open_stdin(cid))

    async def stats(self, cid: str) -> StatsSample:
        return await self._timed("stats", self._engine.stats(cid))

    def stats_stream(self, cid: str) -> ILogStream:
        return self._opened("stats_stream", lambda: self._engine.stats_stream(cid))

    async def stats_reader(self, cid: str) -> IStatsReader | None:
        # Counted when asked for; its reads are the kernel's, not engine calls.
        return await self._timed("stats_reader", self._engine.stats_reader(cid))

    def events(
        self,
        labels: Mapping[str, str],
        *,
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> IEventStream:
        return self._opened(
            "events",
            lambda: self._engine.events(
                labels, since_ns=since_ns, on_break=on_break, on_resume=on_resume
            ),
        )


__all__ = ["MeteredEngine", "EngineObserver"]
