"""
The container-engine seam: exactly what the server domain needs from a runtime.

``servers/`` speaks only this module: ``IContainerEngine`` and its neutral
records, with no engine's field names.  A runtime (``engine/docker``,
``engine/podman``) implements the interface; ``ctrlagent.testing.engine.FakeEngine`` does
it in memory.  Errors are ``ctrlagent.errors`` only: ``NotFound`` (no such
container, image or network), ``Conflict`` (a name taken, a container not
running), ``EngineUnavailable`` (no answer) and ``EngineError`` (any other
refusal); a runtime's own subclasses live beside it.

Methods are declared returning ``Awaitable`` and implemented ``async def``.
Times are nanoseconds since the epoch on the engine's clock, as integers:
a console line's nanosecond is its identity across agent restarts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface

from ctrlagent.errors import EngineError
from ctrlagent.records import record

__all__ = [
    "Mount",
    "PortBinding",
    "ResourceLimits",
    "Confinement",
    "ULIMIT_NAMES",
    "ContainerSpec",
    "ContainerState",
    "EngineEvent",
    "StatsSample",
    "LogLine",
    "ILogStream",
    "IEventStream",
    "IStdinPipe",
    "IStatsReader",
    "IContainerEngine",
    "BUILTIN_NETWORKS",
    "is_builtin_network",
]

# Network modes every engine provides itself: nothing to create.
BUILTIN_NETWORKS = ("bridge", "host", "none", "default")


def is_builtin_network(name: str) -> bool:
    """True for a mode the engine provides (``bridge``, ``host``, ``container:<id>``, ...)."""
    return name in BUILTIN_NETWORKS or name.startswith("container:")


@dataclass(frozen=True)
class Mount:
    """A host directory ``source`` seen at ``target`` inside the container."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class PortBinding:
    """``container_port`` published at ``host_ip:host_port`` for each of ``protocols``."""

    container_port: int
    host_port: int
    host_ip: str
    protocols: tuple[str, ...] = ("tcp", "udp")


@dataclass(frozen=True)
class ResourceLimits:
    """
    A container's resource limits in engine-neutral units.

    ``memory_bytes`` 0 is unlimited (and ``memory_swap_bytes`` is then
    ignored); ``memory_swap_bytes`` is memory plus swap, -1 unlimited swap.
    ``cpu_percent`` 100 is one core, 0 unlimited.  ``io_weight`` is clamped
    by the engine to what it takes (Docker: 10..1000).  ``pids`` 0 leaves the
    engine's default.
    """

    memory_bytes: int = 0
    memory_swap_bytes: int = 0
    cpu_percent: float = 0.0
    io_weight: int = 500
    pids: int = 0


@dataclass(frozen=True)
class Confinement:
    """
    What the container's processes may do beyond an unprivileged user.

    ``no_devices`` spells out a container with no device, no privilege and
    only ``cap_add`` left of the capabilities (the install container).
    """

    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    no_new_privileges: bool = True
    privileged: bool = False
    no_devices: bool = False


# The process limits a container may set (``setrlimit`` names without
# ``RLIMIT_``, as Docker's and Podman's ``--ulimit`` spell them).
ULIMIT_NAMES = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
    "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)


@dataclass(frozen=True)
class ContainerSpec:
    """
    Everything a runtime needs to create one container (no engine field names).

    ``command``/``entrypoint`` None keep the image's own; ``user`` None the
    image's user.  ``interactive`` keeps stdin open for the console (the
    process is then PID 1 itself, with no init in front of it, so stop
    signals reach it).  ``output_max_bytes``/``output_max_files`` bound the
    output the engine keeps for replay (0 = the engine's default).
    ``ulimits`` are the process limits of the container, name (one of
    ``ULIMIT_NAMES``) to ``(soft, hard)``; the ones not named are the
    engine's defaults.
    """

    name: str
    image: str
    labels: Mapping[str, str]
    env: Mapping[str, str]
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    user: str | None = None
    working_dir: str = ""
    mounts: tuple[Mount, ...] = ()
    ports: tuple[PortBinding, ...] = ()
    network: str = "bridge"
    limits: ResourceLimits = ResourceLimits()
    confinement: Confinement = Confinement()
    tmpfs: Mapping[str, str] = field(default_factory=dict)
    interactive: bool = False
    output_max_bytes: int = 0
    output_max_files: int = 1
    ulimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerState:
    """
    A container as ``inspect`` and ``list`` see it.

    ``status`` is the runtime's word ("created", "running", "exited", ...);
    ``started_at_ns`` the last start on the engine's clock (None if never).
    ``limits`` are the live resource limits (``inspect`` only; None from
    ``list``).
    """

    id: str
    names: tuple[str, ...]
    labels: Mapping[str, str]
    running: bool
    status: str
    exit_code: int | None = None
    oom_killed: bool = False
    started_at_ns: int | None = None
    limits: ResourceLimits | None = None


@dataclass(frozen=True)
class EngineEvent:
    """
    One container event: ``start``, ``die``, ``oom``, ``kill``, ``destroy``.

    ``labels`` are the container's labels (plus the runtime's attributes such
    as ``name``); ``exit_code`` is set on ``die``; ``at_ns`` is the event's
    time on the engine's clock.
    """

    action: str
    container_id: str
    labels: Mapping[str, str]
    exit_code: int | None
    at_ns: int

    @property
    def at(self) -> float:
        """``at_ns`` in seconds since the epoch."""
        return self.at_ns / 1e9


@record
class StatsSample:
    """One sample of a container's resource use (CPU in percent of one core)."""

    cpu_percent: float
    memory_bytes: int
    memory_limit_bytes: int
    rx_bytes: int
    tx_bytes: int
    blk_read: int
    blk_write: int
    pids: int


# One is built for every console line of a flooding server: a record (frozen
# for mypy, a plain slotted dataclass at run time; ctrlagent.records).
@record
class LogLine:
    """
    One console line: ``stream`` is "stdout" or "stderr", ``ns`` its time on
    the engine's clock, the line's identity (0 when the engine gave none).
    """

    ns: int
    stream: str
    text: str

    @property
    def at(self) -> float:
        """``ns`` in seconds since the epoch (0.0 when the engine gave no time)."""
        return self.ns / 1e9


class ILogStream(Interface):
    """
    A stream of items (``LogLine`` for output, ``StatsSample`` for stats).

    It ends when the engine ends it (a followed container stops) or by
    ``close()``; a failure ends it with an ``EngineError``.
    """

    def batches(max_items: int = 1000) -> AsyncIterator[list[Any]]:
        """Async iterator of item lists, at most ``max_items`` each, in order."""

    def drain(sink: Callable[[list[Any]], None], max_items: int = 1000) -> Awaitable[None]:
        """
        Hand every item list (at most ``max_items`` each, in order) to
        ``sink`` as it is read, instead of iterating: a consumer that never
        waits (the console) is called directly, with no coroutine woken per
        list.  Fires at the end; fails with the stream's error, or with what
        ``sink`` raised (the stream is then closed).  ``sink`` may close it.
        """

    def close() -> None:
        """End the stream from the consumer's side; iteration stops cleanly."""


async def drain_batches(
    stream: ILogStream, sink: Callable[[list[Any]], None], max_items: int = 1000
) -> None:
    """``ILogStream.drain`` for a stream that only iterates: each list to ``sink``."""
    try:
        async for batch in stream.batches(max_items):
            sink(batch)
    except BaseException:
        stream.close()
        raise


class IEventStream(Interface):
    """``EngineEvent`` iterator that resumes after breaks; it ends only by ``close()``."""

    def __aiter__() -> AsyncIterator[EngineEvent]:
        """The events, each delivered once, in the engine's order."""

    def close() -> None:
        """Stop: the iteration ends cleanly."""


class IStdinPipe(Interface):
    """A container's stdin, open until closed or until the process it serves exits."""

    connected = Attribute("bool: True while bytes written can still reach the container")

    def write_line(text: str) -> None:
        """Write one console command followed by a newline."""

    def write(data: bytes) -> None:
        """Write raw bytes, exactly as given (no newline added): partial input, Ctrl+D."""

    def close() -> Awaitable[None]:
        """Close the pipe (the container keeps running); fires once it is gone."""


class IStatsReader(Interface):
    """
    A running container's resource figures read straight from the host's
    kernel (its cgroup files), without a call to the engine per sample.

    ``read`` costs a few small in-memory file reads: cheap enough for the
    reactor thread, as a socket read is.
    """

    def read() -> StatsSample:
        """
        One sample now, CPU averaged since the previous read (0 at the first).
        ``NotFound`` once the container is gone; ``EngineError`` when its
        figures cannot be read any more for another reason (then ask the
        engine's stats API).
        """

    def close() -> None:
        """Release what the reader holds (idempotent); reads then say ``NotFound``."""


class IContainerEngine(Interface):
    """A container runtime, as the server domain uses it."""

    name = Attribute("str: the runtime's name, 'docker' or 'podman'")

    def ping() -> Awaitable[bool]:
        """True when the engine answers, False when it cannot be reached (never raises)."""

    def version() -> Awaitable[str | None]:
        """The engine's version, None when it cannot be reached (never raises)."""

    def ensure_image(ref: str) -> Awaitable[None]:
        """Make ``ref`` available locally according to the configured pull policy."""

    def ensure_network(name: str, subnet: str | None, labels: Mapping[str, str]) -> Awaitable[None]:
        """The network ``name``, created when missing; nothing for built-in modes."""

    def create(spec: ContainerSpec) -> Awaitable[str]:
        """Create the container; its id.  ``Conflict`` when the name is taken."""

    def last_warnings(cid: str) -> tuple[str, ...]:
        """
        What the engine warned of when it last created ``cid`` or updated its
        limits, in its own words: settings it accepted but does not apply
        (a kernel without block I/O weight, ...).  Empty when it warned of
        nothing, or when this engine object neither created nor updated it.
        """

    def start(cid: str) -> Awaitable[None]:
        """Start the container (already running is fine)."""

    def kill(cid: str, signal: str = "SIGKILL") -> Awaitable[None]:
        """Send ``signal`` to the main process; ``Conflict`` when it is not running."""

    def wait(cid: str) -> Awaitable[int]:
        """The exit code, once the container is not running."""

    def inspect(cid: str) -> Awaitable[ContainerState]:
        """The container's state (``cid`` may be its name)."""

    def list(labels: Mapping[str, str]) -> Awaitable[list[ContainerState]]:
        """Every container (stopped ones too) carrying all of ``labels``."""

    def remove(cid_or_name: str) -> Awaitable[None]:
        """Remove the container, killing it first when it runs."""

    def update_limits(cid: str, limits: ResourceLimits) -> Awaitable[None]:
        """
        Change the resource limits of a running container live.  An engine
        that cannot change a container that does not run says ``Conflict``
        (Podman 4.3); one that keeps the change for the current run only
        says so in ``last_warnings`` (docs/RUNTIMES.md).
        """

    def output(
        cid: str, *, follow: bool, since_ns: int | None = None, tail: int | None = None
    ) -> ILogStream:
        """
        The container's output as ``LogLine`` items: the kept past (only
        lines after ``since_ns``; only the last ``tail``) and, with
        ``follow``, new lines until the container stops.
        """

    def open_stdin(cid: str) -> Awaitable[IStdinPipe]:
        """
        A pipe to the container's stdin, bound to one run of its process:
        the current one, or the next start when it does not run.  An engine
        that would have to prepare the container for that start (Podman:
        its attach initializes it, mounts and all) refuses with ``Conflict``
        instead.
        """

    def stats(cid: str) -> Awaitable[StatsSample]:
        """One resource sample."""

    def stats_stream(cid: str) -> ILogStream:
        """A ``StatsSample`` about every second while the container runs."""

    def stats_reader(cid: str) -> Awaitable[IStatsReader | None]:
        """
        A reader of the running container's figures from the host's kernel,
        or None when this engine cannot offer one (it runs on another host,
        its containers' cgroups are out of reach, the container does not
        run): ``stats``/``stats_stream`` then.  ``NotFound`` when there is
        no such container.
        """

    def events(
        labels: Mapping[str, str],
        *,
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> IEventStream:
        """
        Container events of containers carrying ``labels`` from ``since_ns``
        (now when None), surviving engine restarts: ``on_break`` is told of
        the first failure, ``on_resume`` when events flow again.
        """
