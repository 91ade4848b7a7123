"""
``DockerEngine``: the container-engine seam over the agent's Docker client.

It turns the neutral records of ``engine/interface.py`` into Docker's API
(``bodies.py`` builds the requests) and Docker's answers back into records:
inspect documents into ``ContainerState``, timestamped log lines into
``LogLine`` (the engine's nanosecond is each line's identity), raw events
into ``EngineEvent``, stats into ``StatsSample``.  Errors stay the client's
typed ones, all ``ctrlagent.errors`` categories (``NotFound``, ``Conflict``,
``EngineUnavailable``, ``EngineError``).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import classImplements, implementer

from ctrlagent.engine import cgroups
from ctrlagent.engine.docker.bodies import create_body, resources_body
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.engine.docker.errors import DockerError
from ctrlagent.engine.docker.eventstream import ResumableEvents
from ctrlagent.engine.docker.models import DockerEvent
from ctrlagent.engine.docker.stats import ContainerStats
from ctrlagent.engine.docker.stdin import StdinPipe
from ctrlagent.engine.docker.streams import ItemStream
from ctrlagent.engine.docker.timefmt import parse_started_at, split_timestamp
from ctrlagent.engine.interface import (
    ContainerSpec,
    ContainerState,
    EngineEvent,
    IContainerEngine,
    IEventStream,
    ILogStream,
    IStatsReader,
    IStdinPipe,
    LogLine,
    ResourceLimits,
    StatsSample,
    is_builtin_network,
)
from ctrlagent.errors import EngineError

__all__ = ["DockerEngine", "container_state", "summary_state", "stats_sample", "engine_event"]

classImplements(StdinPipe, IStdinPipe)

# How many containers' create/update warnings an engine object keeps.
_WARNINGS_KEPT = 1024
# How many running containers' main pids an engine object remembers (from inspects).
_PIDS_KEPT = 4096


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _limits(host: Mapping[str, Any]) -> ResourceLimits:
    memory = _int_or_none(host.get("Memory")) or 0
    return ResourceLimits(
        memory_bytes=memory,
        memory_swap_bytes=(_int_or_none(host.get("MemorySwap")) or 0) if memory else 0,
        cpu_percent=(_int_or_none(host.get("NanoCpus")) or 0) / 1e7,
        io_weight=_int_or_none(host.get("BlkioWeight")) or 0,
        pids=max(0, _int_or_none(host.get("PidsLimit")) or 0),
    )


def container_state(doc: Mapping[str, Any]) -> ContainerState:
    """A ``ContainerState`` from an inspect document."""
    state = doc.get("State") or {}
    config = doc.get("Config") or {}
    running = bool(state.get("Running"))
    status = str(state.get("Status") or ("running" if running else ""))
    ended = not running and status in ("exited", "dead")
    return ContainerState(
        id=str(doc.get("Id") or ""),
        names=(str(doc.get("Name") or "").lstrip("/"),),
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        running=running,
        status=status,
        exit_code=_int_or_none(state.get("ExitCode")) if ended else None,
        oom_killed=bool(state.get("OOMKilled")),
        started_at_ns=parse_started_at(state.get("StartedAt")),
        limits=_limits(doc.get("HostConfig") or {}),
    )


# A list entry's Status of an exited container: "Exited (137) 5 seconds ago".
_EXITED = re.compile(r"Exited \((-?[0-9]{1,10})\)")


def summary_state(doc: Mapping[str, Any]) -> ContainerState:
    """
    A ``ContainerState`` from one entry of a container list (no limits; the
    exit code of an exited one as its ``Status`` words it, "Exited (137) 5
    seconds ago", Docker's and Podman's alike).
    """
    status = str(doc.get("State") or "")
    worded = _EXITED.match(str(doc.get("Status") or ""))
    return ContainerState(
        id=str(doc.get("Id") or ""),
        names=tuple(str(n).lstrip("/") for n in doc.get("Names") or ()),
        labels={str(k): str(v) for k, v in (doc.get("Labels") or {}).items()},
        running=status == "running",
        status=status,
        exit_code=int(worded.group(1)) if worded is not None and status == "exited" else None,
    )


def stats_sample(stats: ContainerStats) -> StatsSample:
    """The neutral sample of one Docker stats document."""
    return StatsSample(
        cpu_percent=stats.cpu_percent,
        memory_bytes=stats.memory_bytes,
        memory_limit_bytes=stats.memory_limit_bytes,
        rx_bytes=stats.rx_bytes,
        tx_bytes=stats.tx_bytes,
        blk_read=stats.blk_read,
        blk_write=stats.blk_write,
        pids=stats.pids,
    )


def engine_event(event: DockerEvent) -> EngineEvent:
    """The neutral form of one Docker container event."""
    return EngineEvent(
        action=event.action,
        container_id=event.container_id,
        labels=event.labels,
        exit_code=event.exit_code,
        at_ns=event.time_nano,
    )


def log_lines(batch: list[tuple[str, str]], since_ns: int) -> list[LogLine]:
    """
    ``LogLine``s of a batch of ``(stream, timestamped line)``, those stamped
    after ``since_ns`` only.  The console's hottest loop: one split per line.
    """
    out: list[LogLine] = []
    append = out.append
    for stream, raw in batch:
        ns, text = split_timestamp(raw)
        if ns > since_ns or not ns:
            append(LogLine(ns, stream, text))
    return out


@implementer(ILogStream)
class _LogLines:
    """A Docker log stream read as ``LogLine`` batches."""

    def __init__(self, stream: ItemStream[tuple[str, str]], since_ns: int) -> None:
        self._stream = stream
        self._since = since_ns

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[Any]]:
        while True:
            batch = await self._stream.next_batch(max_items)
            if not batch:
                return
            lines = log_lines(batch, self._since)
            if lines:
                yield lines

    def drain(self, sink: Callable[[list[Any]], None], max_items: int = 1000) -> Deferred[None]:
        since = self._since

        def take(batch: list[tuple[str, str]]) -> None:
            lines = log_lines(batch, since)
            if lines:
                sink(lines)

        return self._stream.drain(take, max_items)

    def close(self) -> None:
        self._stream.close()


@implementer(ILogStream)
class _StatsSamples:
    """
    A Docker stats stream read as ``StatsSample`` batches (each sample put
    through ``fix`` when given: an engine's correction of its own figures).
    """

    def __init__(self, stream: ItemStream[ContainerStats],
                 fix: Callable[[StatsSample], StatsSample] | None = None) -> None:
        self._stream = stream
        self._fix = fix

    def _samples(self, batch: list[ContainerStats]) -> list[Any]:
        fix = self._fix
        if fix is None:
            return [stats_sample(s) for s in batch]
        return [fix(stats_sample(s)) for s in batch]

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[Any]]:
        while True:
            batch = await self._stream.next_batch(max_items)
            if not batch:
                return
            yield self._samples(batch)

    def drain(self, sink: Callable[[list[Any]], None], max_items: int = 1000) -> Deferred[None]:
        return self._stream.drain(lambda batch: sink(self._samples(batch)), max_items)

    def close(self) -> None:
        self._stream.close()


@implementer(IEventStream)
class _Events:
    """
    Resumable Docker events read as ``EngineEvent``s, those after ``since_ns``
    only.  Every removal read (``destroy``; Podman's ``remove``), whoever made
    it, is told to ``removed`` with the container's id, so that the engine
    forgets what it kept of the container.
    """

    def __init__(self, events: ResumableEvents, since_ns: int,
                 removed: Callable[[str], None] = lambda cid: None) -> None:
        self._events = events
        self._since = since_ns
        self._removed = removed

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> EngineEvent:
        while True:
            event = engine_event(await self._events.__anext__())
            if event.action in ("destroy", "remove") and event.container_id:
                self._removed(event.container_id)
            if event.at_ns > self._since:
                return event

    @property
    def reconnects(self) -> int:
        """How often the stream was reopened after a break."""
        return self._events.reconnects

    def close(self) -> None:
        self._events.close()


@implementer(IContainerEngine)
class DockerEngine:
    """
    ``IContainerEngine`` over a ``DockerClient``.

    ``events_retry`` and ``events_retry_max`` are the first and longest pause
    before a broken event stream is reopened (``timeouts.events_retry*``).
    """

    name = "docker"

    def __init__(
        self,
        client: DockerClient,
        clock: IReactorTime,
        *,
        events_retry: float = 0.25,
        events_retry_max: float = 2.0,
    ) -> None:
        self.client = client
        self._clock = clock
        self._events_retry = events_retry
        self._events_retry_max = events_retry_max
        # Container id -> the engine's warnings of its last create or update.
        self._warnings: dict[str, tuple[str, ...]] = {}
        # Container id -> its main process as the last inspect saw it running
        # (``stats_reader`` then needs no call of its own).
        self._pids: dict[str, int] = {}
        # Kernel figures (``stats_reader``) only for an engine on this host;
        # None: decided at the first use (a Unix socket is local, and
        # ``find_cgroup`` checks the rest: same pid namespace, cgroups readable).
        self.local_stats: bool | None = None
        self._host_memory: int | None = None

    async def close(self) -> None:
        """Close the client's idle connections (open streams are their owners')."""
        await self.client.close()

    # -- engine ------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return await self.client.ping()
        except DockerError:
            return False

    async def version(self) -> str | None:
        try:
            doc = await self.client.version()
        except DockerError:
            return None
        version = doc.get("Version")
        return str(version) if version else None

    async def ensure_image(self, ref: str) -> None:
        await self.client.ensure_image(ref)

    async def ensure_network(
        self, name: str, subnet: str | None, labels: Mapping[str, str]
    ) -> None:
        if is_builtin_network(name):
            return
        await self.client.network_ensure(name, subnet or None, labels=dict(labels))

    # -- containers --------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        cid, warnings = await self.client.container_create_warned(spec.name, create_body(spec))
        self._remember(cid, warnings)
        return cid

    def _remember(self, cid: str, warnings: Iterable[str]) -> None:
        kept = tuple(warnings)
        self._warnings.pop(cid, None)
        if kept:
            self._warnings[cid] = kept
            # Bounded: a container removed by name (or behind the agent's
            # back) leaves its entry, the oldest go first.
            while len(self._warnings) > _WARNINGS_KEPT:
                del self._warnings[next(iter(self._warnings))]

    def last_warnings(self, cid: str) -> tuple[str, ...]:
        return self._warnings.get(cid, ())

    async def start(self, cid: str) -> None:
        await self.client.container_start(cid)

    async def kill(self, cid: str, signal: str = "SIGKILL") -> None:
        await self.client.container_kill(cid, signal)

    async def wait(self, cid: str) -> int:
        return await self.client.container_wait(cid)

    async def inspect(self, cid: str) -> ContainerState:
        doc = await self.client.container_inspect(cid)
        self._note_pid(doc)
        return container_state(doc)

    def _note_pid(self, doc: Mapping[str, Any]) -> None:
        cid = str(doc.get("Id") or "")
        state = doc.get("State") or {}
        pid = _int_or_none(state.get("Pid")) if state.get("Running") else None
        self._pids.pop(cid, None)
        if cid and pid:
            self._pids[cid] = pid
            while len(self._pids) > _PIDS_KEPT:
                del self._pids[next(iter(self._pids))]

    async def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        found = await self.client.container_list(labels=dict(labels), all=True)
        return [summary_state(doc) for doc in found]

    async def remove(self, cid_or_name: str) -> None:
        await self.client.container_remove(cid_or_name, force=True)
        self.forget(cid_or_name)

    def forget(self, cid_or_name: str) -> None:
        """Drop what is kept of a removed container (by the agent or anyone else)."""
        self._pids.pop(cid_or_name, None)
        self._warnings.pop(cid_or_name, None)

    async def update_limits(self, cid: str, limits: ResourceLimits) -> None:
        self._remember(cid, await self.client.container_update(cid, resources_body(limits)))

    # -- console -----------------------------------------------------------

    def output(
        self, cid: str, *, follow: bool, since_ns: int | None = None, tail: int | None = None
    ) -> ILogStream:
        # The engine's ``since`` is inclusive: _LogLines drops the lines
        # stamped at ``since_ns`` itself.
        stream = self.client.logs(
            cid,
            follow=follow,
            tail="all" if tail is None else max(0, tail),
            since_ns=since_ns,
            timestamps=True,
        )
        return _LogLines(stream, since_ns or 0)

    async def open_stdin(self, cid: str) -> IStdinPipe:
        pipe: IStdinPipe = await self.client.attach_stdin(cid)
        return pipe

    # -- stats -------------------------------------------------------------

    async def stats(self, cid: str) -> StatsSample:
        return stats_sample(await self.client.stats_once(cid))

    def stats_stream(self, cid: str) -> ILogStream:
        return _StatsSamples(self.client.stats_stream(cid))

    async def stats_reader(self, cid: str) -> IStatsReader | None:
        if self.local_stats is None:
            self.local_stats = self.client.host.kind == "unix"
        if not self.local_stats:
            # Still says NotFound for a container that does not exist.
            await self.client.container_inspect(cid)
            return None
        pid = self._pids.get(cid)
        paths = cgroups.find_cgroup(pid, cid) if pid else None
        if paths is None:
            # Not inspected yet, or a stale pid (a new run): ask the engine.
            doc = await self.client.container_inspect(cid)
            self._note_pid(doc)
            full_id = str(doc.get("Id") or cid)
            pid = self._pids.get(full_id)
            paths = cgroups.find_cgroup(pid, full_id) if pid else None
        if paths is None:
            return None
        if self._host_memory is None:
            self._host_memory = cgroups.host_memory_bytes()
        return cgroups.CgroupStatsReader(
            paths, time.monotonic, host_memory=self._host_memory
        )

    # -- events ------------------------------------------------------------

    def events(
        self,
        labels: Mapping[str, str],
        *,
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> IEventStream:
        # The engine's since is inclusive and in seconds: open a little before
        # the exact nanosecond and drop what is not after it.
        events = self.client.resumable_events(
            dict(labels),
            since=(since_ns - 1_000) / 1e9 if since_ns is not None else None,
            retry_delay=self._events_retry,
            max_retry_delay=self._events_retry_max,
            on_break=on_break,
            on_resume=on_resume,
        )
        return _Events(events, since_ns or 0, self.forget)
