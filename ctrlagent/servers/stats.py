"""
A running server's resource samples, one every ``stats_interval``; the
latest is kept (``latest``) and handed to ``on_sample``.

Where they come from, cheapest first:

- the host's kernel (``servers.stats_from_kernel``), when the engine runs on
  this host and offers an ``IStatsReader`` for the container: a few small
  cgroup files read on the reactor thread, every server on one ``StatsHub``
  timer that visits a fortieth of them every fortieth of the interval (so the
  reads spread evenly, no reactor turn reads more than a few dozen
  servers, and 500 servers cost one timer, not 500).  A server is read every
  ``stats_interval`` while someone follows the figures live (the Panel link,
  connected: it forwards every sample), else every ``stats_idle_interval``;
  a read of the figures (status, metrics, a scrape) then reads the kernel
  first when the latest sample is older than ``stats_interval``
  (``StatsSampler.fresh``), so readers never see older figures than before;
- else the engine's stats API (``servers.stats_mode``): one stream per
  server, or a request per server every ``stats_interval``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ctrlagent.config import ServersConfig
from ctrlagent.engine.interface import IContainerEngine, ILogStream, IStatsReader, StatsSample
from ctrlagent.errors import EngineError, NotFound
from ctrlagent.work import Tracker

MB = 1024 * 1024


class StatsHub:
    """
    Every server's kernel-read samples on one timer.

    The interval is cut into ``slices`` ticks; each sampler belongs to the
    slice with the fewest members when it joins, and each tick reads the
    samplers of one slice: every sampler is read exactly once per interval,
    the reads are spread evenly over it, and no reactor turn reads more than
    a ``slices``-th of the servers, nor more than ``per_tick`` of them (more
    servers add slices: 500 servers at 4 a tick are 125 ticks a round).  When
    servers leave until the slices are twice what the rest need, the rest are
    dealt again over that many (at least ``slices``), so a node that had many
    servers does not keep ticking for them.  The timer runs only while a
    sampler is in the hub.

    ``live()`` says whether someone follows every server's figures as they
    come (the Panel link while connected; ``ServerManager.follow_figures``):
    then the round of visits takes ``interval``.  Otherwise it takes
    ``idle_interval`` (ticks that much further apart, so an unwatched node
    costs a few ticks a minute, not 20 a second), and a visit skips a
    sampler read less than ``interval`` ago (a reader asked for it, see
    ``StatsSampler.fresh``).  ``live()`` is asked at every tick: the rate
    follows the Panel link within one idle tick.  An ``idle_interval`` of 0
    keeps the full rate.
    """

    log = Logger()

    def __init__(
        self, clock: Any, interval: float, slices: int = 40, idle_interval: float = 0.0,
        per_tick: int = 0,
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.idle_interval = max(idle_interval, interval) if idle_interval > 0 else 0.0
        self.live: Callable[[], bool] = lambda: True
        #: Kernel samples taken by the hub's visits (tests, benchmarks).
        self.reads = 0
        self._base = max(1, slices)
        self._slices: list[dict[StatsSampler, None]] = [{} for _ in range(self._base)]
        # At most this many reads a tick (0: no bound): when every slice holds
        # that many, a new slice is added, so ticks come more often rather
        # than longer (one tick's reads hold the reactor, and requests wait
        # behind them).
        self._per_tick = per_tick
        self._where: dict[StatsSampler, int] = {}
        self._next = 0
        self._call: IDelayedCall | None = None
        self.ticks = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sampler: object) -> bool:
        return sampler in self._where

    def add(self, sampler: StatsSampler) -> None:
        """Read ``sampler`` once per interval from now on."""
        if sampler in self._where:
            return
        index = min(range(len(self._slices)), key=lambda i: len(self._slices[i]))
        if self._per_tick and len(self._slices[index]) >= self._per_tick:
            self._slices.append({})
            index = len(self._slices) - 1
        self._slices[index][sampler] = None
        self._where[sampler] = index
        if self._call is None:
            self._call = self._clock.callLater(self._period(self._full_rate()), self._tick)

    def discard(self, sampler: StatsSampler) -> None:
        """Read ``sampler`` no more; the timer stops with the last one."""
        index = self._where.pop(sampler, None)
        if index is not None:
            self._slices[index].pop(sampler, None)
        if not self._where:
            self.stop()
        needed = self._needed()
        if len(self._slices) > self._base and len(self._slices) >= 2 * needed:
            self._deal(needed)

    def _needed(self) -> int:
        """The slices the samplers in the hub need (``slices``, or more at ``per_tick``)."""
        if not self._per_tick:
            return self._base
        return max(self._base, -(-len(self._where) // self._per_tick))

    def _deal(self, count: int) -> None:
        """Deal the samplers anew over ``count`` slices, evenly."""
        self._slices = [{} for _ in range(count)]
        for i, sampler in enumerate(self._where):
            self._slices[i % count][sampler] = None
            self._where[sampler] = i % count
        self._next %= count

    def stop(self) -> None:
        """Cancel the timer (the samplers still in the hub stay, unread)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _full_rate(self) -> bool:
        """Whether every visit reads (someone follows the figures, or no idle rate)."""
        return not self.idle_interval or bool(self.live())

    def _period(self, live: bool) -> float:
        """Seconds between two ticks."""
        whole = self.interval if live or not self.idle_interval else self.idle_interval
        return whole / len(self._slices)

    def _tick(self) -> None:
        self._call = None
        self.ticks += 1
        index, self._next = self._next, (self._next + 1) % len(self._slices)
        live = self._full_rate()
        # Unwatched: a sample a reader just asked for is not taken again.
        fresh_after = None if live else self._clock.seconds() - self.interval
        try:
            for sampler in list(self._slices[index]):
                if fresh_after is not None and sampler.sampled_at > fresh_after:
                    continue
                self.reads += 1
                try:
                    sampler.read_kernel()
                except Exception:
                    # A bug in one server's sample must not stop every
                    # server's stats: that one leaves the hub, logged once.
                    self.log.failure("stats of server {server_id} failed; its kernel"
                                     " reader is dropped", server_id=sampler.server_id)
                    sampler.drop_kernel_reader()
        finally:
            if self._where and self._call is None:
                self._call = self._clock.callLater(self._period(live), self._tick)


class StatsSampler:
    """One server's resource sampling (poll or stream), on while the server is active."""

    log = Logger()

    def __init__(
        self,
        server_id: str,
        *,
        engine: IContainerEngine,
        clock: Any,
        tracker: Tracker,
        config: ServersConfig,
        container_id: Callable[[], str | None],
        active: Callable[[], bool],
        on_sample: Callable[[], None],
        hub: StatsHub | None = None,
    ) -> None:
        self.server_id = server_id
        self._engine = engine
        self._clock = clock
        self._tracker = tracker
        self._config = config
        self._container_id = container_id
        self._active = active
        self._on_sample = on_sample
        self.latest: dict[str, Any] = {}
        #: When ``latest`` was taken (the clock's seconds; -inf: never).
        self.sampled_at = float("-inf")
        self._call: IDelayedCall | None = None
        self._running = False
        self._stream: ILogStream | None = None
        self._hub = hub
        self._reader: IStatsReader | None = None
        self._asking = False
        # Bumped by ``stop``: a reader asked for before it is not used.
        self._epoch = 0

    def start(self) -> None:
        """Sample resource use every ``stats_interval`` while active."""
        cid = self._container_id()
        if cid is None:
            return
        if self._hub is not None and self._config.stats_from_kernel:
            if self._reader is None and not self._asking:
                self._asking = True
                self._tracker.run(
                    self._ask_reader(cid, self._epoch),
                    "stats reader of server {}".format(self.server_id),
                )
            return
        self._start_engine(cid)

    async def _ask_reader(self, cid: str, epoch: int) -> None:
        """The kernel's figures if the engine offers them, else its stats API."""
        try:
            reader = await self._engine.stats_reader(cid)
        except (EngineError, NotFound) as e:
            self.log.debug("no stats reader for {server_id}: {e}", server_id=self.server_id, e=e)
            reader = None
        finally:
            if epoch == self._epoch:
                self._asking = False
        if epoch != self._epoch or cid != self._container_id():
            # Stopped (or another run) meanwhile: that one asks for itself.
            if reader is not None:
                reader.close()
            return
        if reader is None:
            self._start_engine(cid)
            return
        assert self._hub is not None
        self._reader = reader
        self._hub.add(self)
        # At once: memory and the CPU baseline, rather than an interval later.
        self.read_kernel()

    def read_kernel(self) -> None:
        """Read and publish one kernel sample (the hub's tick)."""
        reader = self._reader
        if reader is None:
            return
        try:
            sample = reader.read()
        except NotFound as e:
            # The container's cgroup is gone (it stopped): its end stops us.
            self.log.debug("stats of {server_id} ended: {e}", server_id=self.server_id, e=e)
            self._drop_reader()
            return
        except EngineError as e:
            # Still running, but its files cannot be read (no descriptor
            # left): the engine's stats API from now on, for this run.
            self.log.info("stats of server {server_id} through the engine from now on: {e}",
                          server_id=self.server_id, e=e)
            self._drop_reader()
            cid = self._container_id()
            if cid is not None:
                self._start_engine(cid)
            return
        self.apply(sample)

    def drop_kernel_reader(self) -> None:
        """Read this server's kernel files no more (the hub's tick failed on it)."""
        try:
            self._drop_reader()
        except Exception:
            self.log.failure("closing the kernel reader of {server_id} failed",
                             server_id=self.server_id)
            if self._hub is not None:
                self._hub.discard(self)

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if self._hub is not None:
            self._hub.discard(self)
        if reader is not None:
            reader.close()

    def _start_engine(self, cid: str) -> None:
        """Sample through the engine's stats API (``servers.stats_mode``)."""
        if self._config.stats_mode == "stream":
            if self._stream is None and cid is not None:
                stream = self._engine.stats_stream(cid)
                self._stream = stream
                self._tracker.run(self._pump(stream), "stats of server {}".format(self.server_id))
            return
        if self._call is None or not self._call.active():
            interval = self._config.stats_interval
            # Spread the servers over the interval so samples don't bunch up.
            offset = (hash(self.server_id) % 1000) / 1000.0 * interval
            self._call = self._clock.callLater(offset, self._tick)

    def stop(self) -> None:
        """Stop sampling."""
        self._epoch += 1
        self._asking = False
        self._drop_reader()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    async def _pump(self, stream: ILogStream) -> None:
        """
        Keep the latest sample of the engine's stats stream.

        The engine pushes a sample about every second over one long-lived
        connection per server, which costs the agent far less than a request
        per sample; only one sample per ``stats_interval`` is kept/published.
        """
        interval = self._config.stats_interval
        last = -1e18
        try:
            async for batch in stream.batches(16):
                now = self._clock.seconds()
                if now - last >= interval * 0.95:
                    last = now
                    self.apply(batch[-1])
        except EngineError as e:
            self.log.debug("stats of {server_id} ended: {e}", server_id=self.server_id, e=e)
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            # Shim: an empty (``null``) stats document the engine cannot parse.
            self.log.debug("stats of {server_id} unreadable: {e}", server_id=self.server_id, e=e)
        finally:
            if self._stream is stream:
                self._stream = None

    def _tick(self) -> None:
        self._call = None
        if not self._active() or self._container_id() is None:
            return
        if not self._running:
            self._running = True
            self._tracker.run(self._sample(), "stats of server {}".format(self.server_id))
        self._call = self._clock.callLater(self._config.stats_interval, self._tick)

    async def _sample(self) -> None:
        cid = self._container_id()
        try:
            if cid is None:
                return
            # Not one-shot: the engine samples twice (about a second apart,
            # on its side), so the CPU percent is real.
            sample = await self._engine.stats(cid)
        except EngineError:
            return
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            # Shim: the engine can answer an empty (``null``) stats document
            # for a container that is just starting or stopping, which the
            # engine does not parse; a missed sample is harmless.
            self.log.debug("stats of {server_id} unreadable: {e}", server_id=self.server_id, e=e)
            return
        finally:
            self._running = False
        self.apply(sample)

    def fresh(self) -> None:
        """
        Read the kernel now if the latest sample is older than
        ``stats_interval`` (the hub reads unwatched servers less often): what
        a reader of the figures calls first.  Nothing for engine-API samples,
        which keep their own pace.
        """
        if self._reader is None:
            return
        if self._clock.seconds() - self.sampled_at < self._config.stats_interval:
            return
        self.read_kernel()

    def apply(self, sample: StatsSample) -> None:
        """Keep a stats sample as the latest and publish it."""
        self.sampled_at = now = self._clock.seconds()
        self.latest = {
            "at": now,
            "cpu": round(float(sample.cpu_percent), 3),
            "memory": round(sample.memory_bytes / MB, 3),
            "memoryLimit": round(sample.memory_limit_bytes / MB, 3),
            "rx": sample.rx_bytes,
            "tx": sample.tx_bytes,
            "blkRead": sample.blk_read,
            "blkWrite": sample.blk_write,
            "pids": sample.pids,
        }
        self._on_sample()
