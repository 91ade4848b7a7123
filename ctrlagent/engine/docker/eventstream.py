"""
An event stream that survives breaks without missing events.

``ResumableEvents`` wraps an event stream opener (``DockerClient.events``
with the labels bound): when the stream breaks
(engine restarted, connection dropped, silence timeout) it waits with a
capped exponential backoff and reopens the stream with ``since`` set to the
time of the last event it delivered, skipping the events it has already
delivered (``since`` is inclusive).  ``on_break`` and ``on_resume`` let the
owner mark Docker down and reconcile container states when it comes back:
the engine keeps its event history in memory only, so events that happened
while the engine itself was down cannot be replayed by anyone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlagent.engine.docker.errors import DockerError
from ctrlagent.engine.docker.models import DockerEvent
from ctrlagent.engine.docker.streams import ItemStream

__all__ = ["ResumableEvents", "OpenEvents"]

# Opens the event stream from ``since`` (epoch seconds), calling ``on_open``
# once the engine answered (``DockerClient.events`` with the labels bound).
OpenEvents = Callable[[float, Callable[[], None]], ItemStream[DockerEvent]]


class ResumableEvents:
    """
    Async iterator of ``DockerEvent`` that reopens its stream after a break.

    It ends only by ``close()``.  ``retry_delay`` doubles after every failed
    attempt up to ``max_retry_delay`` and starts again once a stream opens.
    """

    log = Logger()

    def __init__(
        self,
        open_stream: OpenEvents,
        clock: IReactorTime,
        since: float | None = None,
        *,
        retry_delay: float = 0.25,
        max_retry_delay: float = 10.0,
        on_break: Callable[[DockerError], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        remember: int = 1024,
    ) -> None:
        self._open_stream = open_stream
        self._clock = clock
        self._since = since
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._on_break = on_break
        self._on_resume = on_resume
        self._stream: ItemStream[DockerEvent] | None = None
        self._sleep: Deferred[None] | None = None
        self._closed = False
        self._failures = 0
        self._broken = False
        self._last_nano = 0
        self._seen: deque[tuple[int, str, str]] = deque(maxlen=remember)
        self._seen_set: set[tuple[int, str, str]] = set()
        self.reconnects = 0

    def __aiter__(self) -> ResumableEvents:
        return self

    def _resume_point(self) -> float:
        if self._last_nano:
            return self._last_nano / 1e9
        if self._since is None:
            # First open "from now": remember now, so a break before the first
            # event still resumes from here.
            self._since = self._clock.seconds()
        return self._since

    def _remember(self, event: DockerEvent) -> bool:
        key = (event.time_nano, event.container_id, event.action)
        if key in self._seen_set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(key)
        self._seen_set.add(key)
        self._last_nano = max(self._last_nano, event.time_nano)
        return True

    async def __anext__(self) -> DockerEvent:
        while not self._closed:
            if self._stream is None:
                self._stream = self._open_stream(self._resume_point(), self._opened)
            stream = self._stream
            try:
                event = await stream.__anext__()
            except StopAsyncIteration:
                if self._closed:
                    break
                error: DockerError = DockerError(0, "event stream ended")
            except DockerError as e:
                error = e
            else:
                if self._remember(event):
                    return event
                continue
            await self._after_break(stream, error)
        raise StopAsyncIteration

    def _opened(self) -> None:
        self._failures = 0
        if self._broken:
            self._resumed()

    def _resumed(self) -> None:
        self._broken = False
        self.reconnects += 1
        self.log.info("Docker event stream resumed")
        if self._on_resume is not None:
            self._on_resume()

    async def _after_break(self, stream: ItemStream[DockerEvent], error: DockerError) -> None:
        self._stream = None
        stream.close()
        if not self._broken:
            self._broken = True
            self.log.warn(  # noqa: G010 (twisted.logger has no warning)
                "Docker event stream broken: {error}", error=error.message)
            if self._on_break is not None:
                self._on_break(error)
        delay = min(self._max_retry_delay, self._retry_delay * (2 ** min(self._failures, 16)))
        self._failures += 1
        self._sleep = deferLater(self._clock, delay, lambda: None)
        try:
            await self._sleep
        except CancelledError:
            pass
        finally:
            self._sleep = None

    def close(self) -> None:
        """Stop: the iteration ends cleanly."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._sleep is not None:
            self._sleep.cancel()
