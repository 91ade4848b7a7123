"""
An in-memory container engine for tests: ``FakeEngine(clock)``.

It implements ``IContainerEngine`` and runs, for every interactive container,
the scripted game of ``tests/rig/gameserver.sh`` (the real engine tests run
the script itself), chosen by the same environment variables:

- start prints ``Starting scripted game server (pid 1)``, then, after
  ``STARTUP_DELAY`` seconds, ``STARTUP_LINE`` (``Done (0.1s)! For help, type
  help``); ``FLOOD_LINES`` numbered lines and ``flood done`` follow;
  ``TICK_INTERVAL`` prints ``tick <n>`` every so often;
- stdin: every line is echoed as ``> <line>``; ``STOP_COMMAND`` (``stop``)
  exits 0, ``crash <n>`` exits n, ``say <text>`` prints ``[Server] <text>``;
- ``CRASH_AFTER`` seconds after start it exits with ``CRASH_CODE`` (1);
- SIGTERM and SIGINT exit 0 (``Stopping server (SIGTERM)``) unless
  ``IGNORE_SIGTERM=1`` (``SIGTERM ignored``); SIGKILL exits 137.

A container that is not interactive runs a script to its end (the install
container): it prints ``installing`` and exits with ``INSTALL_EXIT`` (0);
``INSTALL_HANG=1`` never ends, ``INSTALL_VANISH=1`` is removed behind the
agent's back at start, ``INSTALL_CREATE_FAILS=1`` is refused at create.

Every output line gets a strictly increasing nanosecond (from the clock), and
every event one too.  ``break_engine()``/``restore_engine()`` take the engine
away and back (calls fail with ``EngineUnavailable``, streams end, event
streams report the break and resume without replaying anything);
``print()``/``die()`` let a test act as the game.  ``created`` records every
``ContainerSpec`` created, ``kills`` every ``(cid, signal)``; every create
and update warns of ``warns`` (``last_warnings``).

``stats_reader`` plays a local engine's kernel figures (a ``FakeStatsReader``
reading the same sample as ``stats``, gone once the run ends) unless
``local_stats`` is False (a remote engine: None); ``stats_readers`` records
every reader handed out.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

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
    drain_batches,
    is_builtin_network,
)
from ctrlagent.errors import Conflict, CtrlAgentError, EngineError, EngineUnavailable, NotFound

__all__ = ["FakeEngine", "FakeContainer"]

DEFAULT_STARTUP_LINE = "Done (0.1s)! For help, type help"
# Exit codes of the signals the scripted game does not trap (128 + number).
_SIGNALS = {"SIGHUP": 1, "SIGQUIT": 3, "SIGABRT": 6, "SIGKILL": 9, "SIGUSR1": 10,
            "SIGUSR2": 12, "SIGTERM": 15}


@implementer(ILogStream)
class FakeStream:
    """Items of a fake stream (``LogLine`` or ``StatsSample``), fed by the engine."""

    def __init__(self, items: list[Any], follow: bool, gate: Deferred[None] | None = None):
        self.items = list(items)
        self.ended = not follow
        self.error: CtrlAgentError | None = None
        self._waiter: Deferred[None] | None = None
        self._gate = gate

    def push(self, item: Any) -> None:
        if not self.ended:
            self.items.append(item)
            self._wake()

    def end(self, error: CtrlAgentError | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[Any]]:
        if self._gate is not None:
            await self._gate
        while True:
            if self.items:
                batch, self.items = self.items[:max_items], self.items[max_items:]
                yield batch
                continue
            if self.ended:
                if self.error is not None:
                    error, self.error = self.error, None
                    raise error
                return
            self._waiter = Deferred()
            await self._waiter

    def drain(self, sink: Callable[[list[Any]], None], max_items: int = 1000) -> Deferred[None]:
        return Deferred.fromCoroutine(drain_batches(self, sink, max_items))

    def close(self) -> None:
        self.items = []
        self.error = None
        self.end()


@implementer(IStdinPipe)
class FakePipe:
    """A container's stdin: lines go to the scripted game."""

    def __init__(self, engine: FakeEngine, container: FakeContainer) -> None:
        self._engine = engine
        self._container = container
        # Opened while it does not run: bound to the run that comes (as
        # Docker's attach, which waits for the next start).
        self._run = container.runs if container.running else container.runs + 1
        self._closed = False
        self._pending = b""

    @property
    def connected(self) -> bool:
        """True while the process it was opened for runs and the pipe is open."""
        c = self._container
        if self._closed or not self._engine.up:
            return False
        if not c.running:
            return c.runs + 1 == self._run  # open, waiting for the start
        return c.runs == self._run

    def write_line(self, text: str) -> None:
        if not self.connected:
            raise EngineUnavailable("console stdin is closed")
        if self._container.running:
            self._engine.stdin(self._container.cid, text)

    def write(self, data: bytes) -> None:
        """Raw bytes: the game reads a line once its newline has come (as a shell's read)."""
        if not self.connected:
            raise EngineUnavailable("console stdin is closed")
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            if self._container.running:
                self._engine.stdin(self._container.cid,
                                   line.decode("utf-8", "surrogateescape"))

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)


@implementer(IEventStream)
class FakeEvents:
    """Events from the engine's history, each once, surviving breaks."""

    def __init__(
        self,
        engine: FakeEngine,
        labels: Mapping[str, str],
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._labels = dict(labels)
        self._since = engine.now_ns() if since_ns is None else since_ns
        self._next = 0
        self._waiter: Deferred[None] | None = None
        self._closed = False
        self.on_break = on_break
        self.on_resume = on_resume
        self.reconnects = 0

    def __aiter__(self) -> FakeEvents:
        return self

    def _wanted(self, event: EngineEvent) -> bool:
        return event.at_ns > self._since and all(
            event.labels.get(k) == v for k, v in self._labels.items()
        )

    async def __anext__(self) -> EngineEvent:
        history = self._engine.history
        while not self._closed:
            if self._engine.up:
                while self._next < len(history):
                    event = history[self._next]
                    self._next += 1
                    if self._wanted(event):
                        return event
            self._waiter = Deferred()
            try:
                await self._waiter
            except CancelledError:
                break
        raise StopAsyncIteration

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def close(self) -> None:
        self._closed = True
        self._engine.event_streams.discard(self)
        self.wake()


@dataclass
class FakeContainer:
    """One container of the fake engine."""

    cid: str
    spec: ContainerSpec
    limits: ResourceLimits
    status: str = "created"
    exit_code: int | None = None
    oom: bool = False
    started_at_ns: int | None = None
    runs: int = 0
    log: list[LogLine] = field(default_factory=list)
    followers: list[FakeStream] = field(default_factory=list)
    stats_followers: list[FakeStream] = field(default_factory=list)
    waiters: list[Deferred[int]] = field(default_factory=list)
    timers: list[IDelayedCall] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def env(self) -> Mapping[str, str]:
        return self.spec.env

    @property
    def running(self) -> bool:
        return self.status == "running"


@implementer(IStatsReader)
class FakeStatsReader:
    """A container's figures "from the kernel": readable while its run lasts."""

    def __init__(self, engine: FakeEngine, container: FakeContainer) -> None:
        self._engine = engine
        self._container = container
        self._run = container.runs
        self.reads = 0
        self.closed = False

    def read(self) -> StatsSample:
        c = self._container
        if (
            self.closed
            or not c.running
            or c.runs != self._run
            or self._engine.containers.get(c.cid) is not c
        ):
            raise NotFound("container cgroup gone")
        self.reads += 1
        sample = self._engine._sample(c)
        # As the kernel's: CPU is a rate between two reads, 0 at the first.
        return sample if self.reads > 1 else replace(sample, cpu_percent=0.0)

    def close(self) -> None:
        self.closed = True


@implementer(IContainerEngine)
class FakeEngine:
    """``IContainerEngine`` in memory (see the module docstring)."""

    name = "fake"

    def __init__(self, clock: IReactorTime, *, images: tuple[str, ...] | None = None) -> None:
        self.clock = clock
        self.up = True
        self.containers: dict[str, FakeContainer] = {}
        self.networks: dict[str, dict[str, Any]] = {}
        # None: every image exists; else only these (ensure_image of another fails).
        self.images = images
        self.created: list[ContainerSpec] = []
        self.kills: list[tuple[str, str]] = []
        self.starts = 0
        self.history: list[EngineEvent] = []
        self.event_streams: set[FakeEvents] = set()
        # When set, reading output without following waits for it (a slow history).
        self.history_gate: Deferred[None] | None = None
        # What the engine warns of on every create and update (a test sets it
        # to play an engine that drops a setting, as Docker on a kernel
        # without block I/O weight).
        self.warns: tuple[str, ...] = ()
        self._warnings: dict[str, tuple[str, ...]] = {}
        # False plays an engine on another host: no kernel figures.
        self.local_stats = True
        self.stats_readers: list[FakeStatsReader] = []
        self._ids = itertools.count(1)
        self._last_ns = 0

    # -- the clock ---------------------------------------------------------

    def now_ns(self) -> int:
        """The engine's time: the clock's, strictly increasing on every call."""
        ns = max(self._last_ns + 1, int(self.clock.seconds() * 1e9))
        self._last_ns = ns
        return ns

    # -- acting as the game and the engine (for tests) ---------------------

    def _check(self) -> None:
        if not self.up:
            raise EngineUnavailable("the fake engine is down")

    def get(self, cid: str) -> FakeContainer:
        """The container with id (or name) ``cid``; ``NotFound`` otherwise."""
        found = self.containers.get(cid)
        if found is not None:
            return found
        for c in self.containers.values():
            if c.name == cid:
                return c
        raise NotFound("no such container: {}".format(cid))

    def print(self, cid: str, text: str, stream: str = "stdout") -> LogLine:
        """The game prints ``text``."""
        c = self.get(cid)
        line = LogLine(self.now_ns(), stream, text)
        c.log.append(line)
        for follower in c.followers:
            follower.push(line)
        return line

    def die(
        self, cid: str, code: int, oom: bool = False, external_kill: bool = False,
        silent: bool = False,
    ) -> None:
        """
        The container's process ends with ``code`` (``oom``: killed for
        memory); ``silent``: the engine loses the events of it (none is sent).
        """
        c = self.get(cid)
        if not c.running:
            return
        c.status = "exited"
        c.exit_code = code
        c.oom = oom
        for timer in c.timers:
            if timer.active():
                timer.cancel()
        c.timers = []
        for follower in c.followers + c.stats_followers:
            follower.end()
        c.followers, c.stats_followers = [], []
        waiters, c.waiters = c.waiters, []
        for waiter in waiters:
            waiter.callback(code)
        if silent:
            return
        if external_kill:
            self._event("kill", c)
        if oom:
            self._event("oom", c)
        self._event("die", c, code)

    def _event(self, action: str, c: FakeContainer, code: int | None = None) -> None:
        labels = {**c.spec.labels, "name": c.name, "image": c.spec.image}
        if code is not None:
            labels["exitCode"] = str(code)
        self.history.append(EngineEvent(action, c.cid, labels, code, self.now_ns()))
        for stream in list(self.event_streams):
            stream.wake()

    def stdin(self, cid: str, text: str) -> None:
        """A console line reaches the game's stdin."""
        c = self.get(cid)
        if not c.running:
            return
        self.print(cid, "> " + text)
        if text == c.env.get("STOP_COMMAND", "stop"):
            self.print(cid, "Stopping server (console)")
            self.die(cid, 0)
        elif text.startswith("crash "):
            code = text[len("crash "):]
            self.print(cid, "Crashing with exit code {}".format(code))
            try:
                self.die(cid, int(code))
            except ValueError:
                self.die(cid, 2)  # sh: exit with a non-number
        elif text.startswith("say "):
            self.print(cid, "[Server] " + text[4:])

    def break_engine(self) -> None:
        """The engine goes away: calls fail, streams end, event streams report it."""
        if not self.up:
            return
        self.up = False
        error = EngineUnavailable("the fake engine is down")
        for c in self.containers.values():
            for follower in c.followers + c.stats_followers:
                follower.end(error)
            c.followers, c.stats_followers = [], []
        for stream in list(self.event_streams):
            stream.on_break(error)

    def restore_engine(self) -> None:
        """The engine is back: event streams resume where they were."""
        if self.up:
            return
        self.up = True
        for stream in list(self.event_streams):
            stream.reconnects += 1
            stream.on_resume()
            stream.wake()

    # -- IContainerEngine --------------------------------------------------

    async def ping(self) -> bool:
        return self.up

    async def version(self) -> str | None:
        return "fake-1.0" if self.up else None

    async def ensure_image(self, ref: str) -> None:
        self._check()
        if self.images is not None and ref not in self.images:
            raise NotFound("image {} not found".format(ref))

    async def ensure_network(
        self, name: str, subnet: str | None, labels: Mapping[str, str]
    ) -> None:
        self._check()
        if is_builtin_network(name):
            return
        self.networks.setdefault(name, {"name": name, "subnet": subnet, "labels": dict(labels)})

    async def create(self, spec: ContainerSpec) -> str:
        self._check()
        if not is_builtin_network(spec.network) and spec.network not in self.networks:
            raise NotFound("network {} not found".format(spec.network))
        if self.images is not None and spec.image not in self.images:
            raise NotFound("image {} not found".format(spec.image))
        if any(c.name == spec.name for c in self.containers.values()):
            raise Conflict("the container name {} is already in use".format(spec.name))
        if not spec.interactive and spec.env.get("INSTALL_CREATE_FAILS") == "1":
            raise EngineError("the engine refused the install container")
        cid = "{:064x}".format(next(self._ids))
        self.created.append(spec)
        self.containers[cid] = FakeContainer(cid, spec, spec.limits)
        self._warnings[cid] = self.warns
        return cid

    def last_warnings(self, cid: str) -> tuple[str, ...]:
        return self._warnings.get(cid, ())

    async def start(self, cid: str) -> None:
        self._check()
        c = self.get(cid)
        if c.running:
            return
        c.status = "running"
        c.exit_code = None
        c.oom = False
        c.runs += 1
        c.started_at_ns = self.now_ns()
        self.starts += 1
        self._event("start", c)
        if not c.spec.interactive:
            self._run_script(c)
        else:
            self._run_game(c)

    def _run_script(self, c: FakeContainer) -> None:
        if c.env.get("INSTALL_VANISH") == "1":
            del self.containers[c.cid]
            self._event("destroy", c)
            return
        if c.env.get("INSTALL_HANG") == "1":
            return
        self.print(c.cid, "installing")
        try:
            code = int(c.env.get("INSTALL_EXIT", "0") or 0)
        except ValueError:
            code = 2
        self.die(c.cid, code)

    def _later(self, c: FakeContainer, seconds: float, action: Callable[[], None]) -> None:
        c.timers.append(self.clock.callLater(seconds, action))

    def _run_game(self, c: FakeContainer) -> None:
        cid, env = c.cid, c.env
        self.print(cid, "Starting scripted game server (pid 1)")
        if env.get("CRASH_AFTER"):
            code = int(env.get("CRASH_CODE", "1") or 1)

            def crash() -> None:
                self.print(cid, "Crashing with exit code {}".format(code))
                self.die(cid, code)

            self._later(c, float(env["CRASH_AFTER"]), crash)

        def started() -> None:
            self.print(cid, env.get("STARTUP_LINE", DEFAULT_STARTUP_LINE))
            if env.get("FLOOD_LINES"):
                for n in range(1, int(env["FLOOD_LINES"]) + 1):
                    self.print(cid, str(n))
                self.print(cid, "flood done")
            if env.get("TICK_INTERVAL"):
                self._tick(c, float(env["TICK_INTERVAL"]), 1)

        delay = float(env.get("STARTUP_DELAY", "0") or 0)
        if delay > 0:
            self._later(c, delay, started)
        else:
            started()

    def _tick(self, c: FakeContainer, interval: float, n: int) -> None:
        def tick() -> None:
            self.print(c.cid, "tick {}".format(n))
            self._tick(c, interval, n + 1)

        self._later(c, interval, tick)

    async def kill(self, cid: str, signal: str = "SIGKILL") -> None:
        self._check()
        c = self.get(cid)
        if not c.running:
            raise Conflict("container {} is not running".format(cid))
        self.kills.append((cid, signal))
        self._event("kill", c)
        if signal in ("SIGKILL", "KILL", "9"):
            self.die(cid, 137)
        elif signal in ("SIGTERM", "SIGINT") and c.spec.interactive:
            if signal == "SIGTERM" and c.env.get("IGNORE_SIGTERM") == "1":
                self.print(cid, "SIGTERM ignored")
                return
            self.print(cid, "Stopping server ({})".format(signal))
            self.die(cid, 0)
        else:
            self.die(cid, 128 + _SIGNALS.get(signal, 15))

    async def wait(self, cid: str) -> int:
        self._check()
        c = self.get(cid)
        if not c.running:
            return c.exit_code if c.exit_code is not None else 0
        waiter: Deferred[int] = Deferred()
        c.waiters.append(waiter)
        return await waiter

    def _state(self, c: FakeContainer, *, with_limits: bool) -> ContainerState:
        return ContainerState(
            id=c.cid,
            names=(c.name,),
            labels=dict(c.spec.labels),
            running=c.running,
            status=c.status,
            exit_code=c.exit_code if not c.running else None,
            oom_killed=c.oom,
            started_at_ns=c.started_at_ns,
            limits=c.limits if with_limits else None,
        )

    async def inspect(self, cid: str) -> ContainerState:
        self._check()
        return self._state(self.get(cid), with_limits=True)

    async def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        self._check()
        return [
            self._state(c, with_limits=False)
            for c in self.containers.values()
            if all(c.spec.labels.get(k) == v for k, v in labels.items())
        ]

    async def remove(self, cid_or_name: str) -> None:
        self._check()
        c = self.get(cid_or_name)
        if c.running:
            self._event("kill", c)
            self.die(c.cid, 137)
        del self.containers[c.cid]
        self._warnings.pop(c.cid, None)
        for follower in c.followers + c.stats_followers:
            follower.end()
        waiters, c.waiters = c.waiters, []
        for waiter in waiters:
            waiter.errback(NotFound("no such container: {}".format(c.cid)))
        self._event("destroy", c)

    async def update_limits(self, cid: str, limits: ResourceLimits) -> None:
        self._check()
        c = self.get(cid)
        c.limits = limits
        self._warnings[c.cid] = self.warns

    def _failed(self, cid: str) -> FakeStream | None:
        """A stream ending at once with the error a call on ``cid`` meets now, if any."""
        error: CtrlAgentError | None = None
        if not self.up:
            error = EngineUnavailable("the fake engine is down")
        elif not any(cid in (c.cid, c.name) for c in self.containers.values()):
            error = NotFound("no such container: {}".format(cid))
        if error is None:
            return None
        stream = FakeStream([], follow=False)
        stream.error = error
        return stream

    def output(
        self, cid: str, *, follow: bool, since_ns: int | None = None, tail: int | None = None
    ) -> ILogStream:
        failed = self._failed(cid)
        if failed is not None:
            return failed
        c = self.get(cid)
        items = [line for line in c.log if since_ns is None or line.ns > since_ns]
        if tail is not None:
            items = items[-tail:] if tail > 0 else []
        live = follow and c.running
        stream = FakeStream(items, follow=live, gate=None if follow else self.history_gate)
        if live:
            c.followers.append(stream)
        return stream

    async def open_stdin(self, cid: str) -> IStdinPipe:
        self._check()
        # Docker attaches to a container that does not run too: the pipe
        # waits for its next start.
        return FakePipe(self, self.get(cid))

    def _sample(self, c: FakeContainer) -> StatsSample:
        if not c.running:
            return StatsSample(0.0, 0, 0, 0, 0, 0, 0, 0)
        limit = c.limits.memory_bytes or 64 * 1024 * 1024
        return StatsSample(12.5, 50 * 1024 * 1024, limit, 100, 200, 0, 0, 3)

    async def stats(self, cid: str) -> StatsSample:
        self._check()
        return self._sample(self.get(cid))

    def stats_stream(self, cid: str) -> ILogStream:
        failed = self._failed(cid)
        if failed is not None:
            return failed
        c = self.get(cid)
        stream = FakeStream([self._sample(c)], follow=c.running and self.up)
        if c.running:
            c.stats_followers.append(stream)
        return stream

    async def stats_reader(self, cid: str) -> IStatsReader | None:
        self._check()
        c = self.get(cid)
        if not self.local_stats or not c.running:
            return None
        reader = FakeStatsReader(self, c)
        self.stats_readers.append(reader)
        return reader

    def tick_stats(self) -> None:
        """Every followed running container reports one more sample."""
        for c in self.containers.values():
            for stream in c.stats_followers:
                stream.push(self._sample(c))

    def events(
        self,
        labels: Mapping[str, str],
        *,
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> IEventStream:
        stream = FakeEvents(self, labels, since_ns, on_break, on_resume)
        self.event_streams.add(stream)
        return stream
