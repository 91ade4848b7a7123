"""
Streaming responses of the engine as async iterators with backpressure.

An ``ItemStream`` owns one streaming HTTP response (logs, attach output,
stats, events, pull progress).  The body's bytes go through a decoder (the
console demultiplexer, or a JSON-lines parser) and the items wait in a queue
until the consumer takes them with ``async for``.  When the queue holds
``high_water`` items the transport is paused, so a slow consumer slows the
engine down instead of growing memory; it resumes below ``low_water``.

A consumer that handles items at once, without waiting (the console), can
``drain`` the stream instead: each batch goes to its function in the reactor
turn it was decoded, with no queue and no coroutine woken per batch; the
console's per-line path at hundreds of servers.

A silence timeout (when configured) ends a stream whose engine sends nothing
for that long with ``DockerTimeout``.  A connection lost in the middle of the
body ends it with ``DockerUnavailable``, after every item already received has
been handed out.  ``close()`` ends it from the consumer's side.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ctrlagent.engine.docker.errors import DockerError, DockerTimeout, DockerUnavailable
from ctrlagent.engine.docker.mux import ConsoleDecoder, LineSplitter

__all__ = ["ItemStream", "LineStream", "JsonLinesDecoder", "Decoder"]

T = TypeVar("T")
T_co = TypeVar("T_co")


# Given how a stream ended (None: cleanly), the error to end it with (None: clean).
EndCheck = Callable[["DockerError | None"], Awaitable["DockerError | None"]]


class Decoder(Protocol[T_co]):
    """Bytes in, items out (see ``ctrlagent.engine.docker.mux.ConsoleDecoder``)."""

    def feed(self, data: bytes) -> list[T_co]: ...

    def flush(self) -> list[T_co]: ...


class JsonLinesDecoder:
    """
    A stream of JSON documents, one a line, decoded with ``convert``.

    Used for events, stats and pull progress.  Lines that are not JSON are
    skipped (the engine only sends JSON here); ``cap`` bounds a line.
    """

    def __init__(self, convert: Callable[[dict[str, Any]], Any], cap: int = 4 * 1024 * 1024):
        self._lines = LineSplitter(cap)
        self._convert = convert

    def _decode(self, lines: list[str]) -> list[Any]:
        out = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(self._convert(doc))
        return out

    def feed(self, data: bytes) -> list[Any]:
        return self._decode(self._lines.feed(data))

    def flush(self) -> list[Any]:
        return self._decode(self._lines.flush())


class _BodyProtocol(TwistedProtocol):
    """Forwards a response body to its ``ItemStream``."""

    def __init__(self, stream: ItemStream[Any]) -> None:
        self._stream = stream

    def connectionMade(self) -> None:  # noqa: N802 (Twisted hook)
        self._stream._make_connection(self.transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        self._stream._data_received(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self._stream._connection_lost(reason)


class _WholeReadsProtocol(_BodyProtocol):
    """A body whose pieces are whole reads already (``rawhttp``): decoded at once."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        self._stream._read_received(data)


class ItemStream(Generic[T]):
    """
    An async iterator over the items of one streaming engine response.

    ``open`` is a coroutine function returning the response (status already
    checked); it is started at once, so an error (404, engine down) surfaces
    on the first ``__anext__``.  Iterate with ``async for item in stream`` or,
    cheaper under floods, ``async for batch in stream.batches()``; or hand
    every batch to a function with ``drain``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        decoder: Decoder[T],
        open: Callable[[], Awaitable[Any]],
        *,
        silence_timeout: float = 0.0,
        high_water: int = 20_000,
        low_water: int | None = None,
        description: str = "stream",
        on_open: Callable[[], None] | None = None,
        verify_end: EndCheck | None = None,
    ) -> None:
        self._clock = clock
        self._on_open = on_open
        self._verify_end = verify_end
        self._decoder = decoder
        self._items: deque[T] = deque()
        self._high = max(1, high_water)
        self._low = low_water if low_water is not None else self._high // 4
        self._silence = silence_timeout
        self._description = description
        self._waiter: Deferred[None] | None = None
        self._transport: Any = None
        self._paused = False
        self._done = False
        self._closed = False
        self._error: BaseException | None = None
        self._timer: IDelayedCall | None = None
        self._last_data = clock.seconds()
        self.bytes_received = 0
        self._raw: list[bytes] = []
        self._process_call: IDelayedCall | None = None
        # ``drain``'s consumer, its batch size, and what fires at the end.
        self._sink: Callable[[list[T]], None] | None = None
        self._sink_max = 1000
        self._drained: Deferred[None] | None = None
        self.opened = False
        self._opening: Deferred[None] | None = Deferred.fromCoroutine(self._open(open))

    # -- opening -----------------------------------------------------------

    async def _open(self, open: Callable[[], Awaitable[Any]]) -> None:
        try:
            response = await open()
        except CancelledError:
            self._finish(None)
            return
        except DockerError as e:
            self._finish(e)
            return
        except Exception as e:  # noqa: BLE001 - any failure ends the stream, typed
            self._finish(DockerUnavailable("{} failed: {}".format(self._description, e)))
            return
        finally:
            self._opening = None
        self.opened = True
        if self._closed:
            response.deliverBody(_Discard())
            return
        if self._on_open is not None:
            self._on_open()
        if self._closed:
            response.deliverBody(_Discard())
            return
        self._last_data = self._clock.seconds()
        self._arm_timer()
        # A body read without twisted.web (``rawhttp``) comes a whole read at
        # a time: it is decoded at once, with no turn's gathering to wait for.
        body = _WholeReadsProtocol if getattr(response, "whole_reads", False) else _BodyProtocol
        response.deliverBody(body(self))

    # -- the producer side -------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._transport is None or self._closed:
            return
        # Engines often send one line per write (one HTTP chunk each): collect
        # what arrives within one reactor turn and decode it in one go, waking
        # the consumer once rather than once per chunk.
        self._raw.append(data)
        if self._process_call is None:
            self._process_call = self._clock.callLater(0, self._process)

    def _read_received(self, data: bytes) -> None:
        if self._transport is None or self._closed:
            return
        self._take(data)

    def _process(self) -> None:
        self._process_call = None
        if not self._raw:
            return
        data = b"".join(self._raw) if len(self._raw) > 1 else self._raw[0]
        self._raw.clear()
        self._take(data)

    def _take(self, data: bytes) -> None:
        """Decode ``data`` and hand its items on (or queue them)."""
        self.bytes_received += len(data)
        if self._silence:
            self._last_data = self._clock.seconds()
        items = self._decoder.feed(data)
        if items and self._sink is not None:
            self._hand(items)
        elif items:
            self._items.extend(items)
            if not self._paused and len(self._items) >= self._high and self._transport:
                self._paused = True
                self._transport.pauseProducing()
            self._wake()

    def _process_now(self) -> None:
        call, self._process_call = self._process_call, None
        if call is not None and call.active():
            call.cancel()
        self._process()

    def _connection_lost(self, reason: Failure | None) -> None:
        try:
            if not self._closed:
                self._process_now()
            self._transport = None
            rest = self._decoder.flush()
            if rest and self._sink is not None:
                self._hand(rest)
            else:
                self._items.extend(rest)
        except Exception as e:  # noqa: BLE001 - a decoder bug must not hang the consumer
            self._finish(DockerError(0, "{}: cannot decode: {}".format(self._description, e)))
            return
        error: DockerError | None = None
        if not (self._closed or reason is None or reason.check(ResponseDone, PotentialDataLoss)):
            error = DockerUnavailable(
                "{} broken: {}".format(self._description, _reason_text(reason))
            )
        if self._verify_end is not None and not self._closed:
            # Ask the engine what the end means: a stopping engine ends follow
            # streams cleanly, a force-removed container breaks them.
            Deferred.fromCoroutine(self._verify(self._verify_end, error))
        else:
            self._finish(error)

    async def _verify(self, verify: EndCheck, error: DockerError | None) -> None:
        try:
            result = await verify(error)
        except Exception as e:  # noqa: BLE001 - never an unhandled error from here
            result = DockerUnavailable("{} ended: {}".format(self._description, e))
        self._finish(result)

    def _make_connection(self, transport: Any) -> None:
        self._transport = transport

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if not self._closed:
            self._error = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._wake()
        self._end_drain()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    # -- silence timeout ---------------------------------------------------

    def _arm_timer(self) -> None:
        if self._silence > 0 and not self._done:
            self._timer = self._clock.callLater(self._silence, self._check_silence)

    def _check_silence(self) -> None:
        self._timer = None
        if self._done:
            return
        idle = self._clock.seconds() - self._last_data
        if self._paused or idle < self._silence:
            # Paused by our own consumer: not the engine's silence.
            self._timer = self._clock.callLater(
                max(self._silence - idle, 0.001) if not self._paused else self._silence,
                self._check_silence,
            )
            return
        transport = self._transport
        self._finish(
            DockerTimeout("{} silent for {:.1f}s".format(self._description, self._silence))
        )
        if transport is not None:
            transport.stopProducing()

    # -- the consumer side -------------------------------------------------

    def __aiter__(self) -> ItemStream[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if not self._items and self._raw:
                self._process_now()
            if self._items:
                item = self._items.popleft()
                if self._paused and len(self._items) <= self._low:
                    self._resume()
                return item
            if self._done:
                if self._error is not None:
                    error, self._error = self._error, None
                    self._closed = True
                    raise error
                raise StopAsyncIteration
            self._waiter = Deferred()
            await self._waiter

    async def next_batch(self, max_items: int = 1000) -> list[T]:
        """
        Every queued item (at most ``max_items``), waiting for at least one.

        Returns an empty list at the end of the stream; raises its error.
        """
        while True:
            if not self._items and self._raw:
                self._process_now()
            if self._items:
                n = min(max_items, len(self._items))
                if n == len(self._items):
                    batch = list(self._items)
                    self._items.clear()
                else:
                    batch = [self._items.popleft() for _ in range(n)]
                if self._paused and len(self._items) <= self._low:
                    self._resume()
                return batch
            if self._done:
                if self._error is not None:
                    error, self._error = self._error, None
                    self._closed = True
                    raise error
                return []
            self._waiter = Deferred()
            await self._waiter

    async def batches(self, max_items: int = 1000) -> Any:
        """Async iterator of item lists (one list per wake-up, at most ``max_items``)."""
        while True:
            batch = await self.next_batch(max_items)
            if not batch:
                return
            yield batch

    def drain(self, sink: Callable[[list[T]], None], max_items: int = 1000) -> Deferred[None]:
        """
        Hand every item to ``sink`` as it is decoded, in batches of at most
        ``max_items``, instead of iterating.

        Items already queued go first, at once.  ``sink`` runs in the reactor
        turn the bytes arrived in, so it must not wait; it may ``close`` the
        stream.  The Deferred fires at the end of the stream, fails with its
        error, or with what ``sink`` raised (the stream is then closed).  One
        consumer per stream: not together with iteration.
        """
        if self._sink is not None:
            raise RuntimeError("{} is drained already".format(self._description))
        self._sink, self._sink_max = sink, max(1, max_items)
        self._drained = Deferred()
        drained = self._drained
        if self._paused:
            self._resume()
        if self._items:
            queued = list(self._items)
            self._items.clear()
            self._hand(queued)
        if self._done:
            self._end_drain()
        return drained

    def _hand(self, items: list[T]) -> None:
        sink, size = self._sink, self._sink_max
        if sink is None or self._closed:
            return
        try:
            if len(items) <= size:
                sink(items)
                return
            for start in range(0, len(items), size):
                if self._closed:
                    return
                sink(items[start:start + size])
        except Exception as e:  # noqa: BLE001 - the consumer's failure ends the stream
            drained, self._drained = self._drained, None
            self.close()
            if drained is not None:
                drained.errback(e)

    def _end_drain(self) -> None:
        drained = self._drained
        if drained is None or not self._done:
            return
        self._drained = None
        error, self._error = self._error, None
        if error is not None:
            self._closed = True
            drained.errback(error)
        else:
            drained.callback(None)

    def _resume(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resumeProducing()

    @property
    def done(self) -> bool:
        """True once the stream has ended (items may still be queued)."""
        return self._done

    def close(self) -> None:
        """End the stream from the consumer's side; iteration stops cleanly."""
        if self._closed:
            return
        self._closed = True
        self._items.clear()
        self._raw.clear()
        if self._process_call is not None and self._process_call.active():
            self._process_call.cancel()
        self._process_call = None
        if self._opening is not None:
            self._opening.cancel()
        transport = self._transport
        if transport is not None:
            if self._paused:
                self._paused = False
                transport.resumeProducing()
            transport.stopProducing()
        self._finish(None)


class LineStream(ItemStream[tuple[str, str]]):
    """A console stream: ``(stream, line)`` items, stream being "stdout"/"stderr"."""

    @classmethod
    def console(
        cls,
        clock: IReactorTime,
        open: Callable[[], Awaitable[Any]],
        *,
        tty: bool,
        line_cap: int,
        silence_timeout: float = 0.0,
        description: str = "console stream",
        verify_end: EndCheck | None = None,
    ) -> LineStream:
        """A console stream decoding frames (or TTY bytes) into lines."""
        return cls(
            clock,
            ConsoleDecoder(tty=tty, cap=line_cap),
            open,
            silence_timeout=silence_timeout,
            description=description,
            verify_end=verify_end,
        )


class _Discard(TwistedProtocol):
    """Swallows the body of a response nobody wants any more."""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted hook)
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        pass


def _reason_text(reason: Failure) -> str:
    value = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(str(r.getErrorMessage()) for r in inner)
    return reason.getErrorMessage()

