"""
A running server's resource samples: polled every ``stats_interval`` or read
from the engine's stats stream (``servers.stats_mode``); the latest one is
kept (``latest``) and handed to ``on_sample``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ctrlagent.config import ServersConfig
from ctrlagent.engine.interface import IContainerEngine, ILogStream, StatsSample
from ctrlagent.errors import EngineError
from ctrlagent.work import Tracker

MB = 1024 * 1024


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
        self._call: IDelayedCall | None = None
        self._running = False
        self._stream: ILogStream | None = None

    def start(self) -> None:
        """Sample resource use every ``stats_interval`` while active."""
        cid = self._container_id()
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

    def apply(self, sample: StatsSample) -> None:
        """Keep a stats sample as the latest and publish it."""
        self.latest = {
            "at": self._clock.seconds(),
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
